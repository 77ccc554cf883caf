// The SSD swap tier's O_DIRECT loop in one call (kernels/staged_io.py): gather KV runs into a page-aligned
// staging buffer, checksum each piece as it is staged (CRC-32C, cpu_crc32c.cpp: the bytes are in the CPU's caches
// then) and pwrite the buffer each time it is full; or pread a buffer's worth, checksum and scatter it into the runs.
// The same loop in Python (memory/extent_store.py) drops and retakes the GIL around every copy and system call,
// and on a swap thread beside the engine's each retake waits for the engine thread's switch interval: a 144 KiB
// extent took 6-8 ms instead of 0.2 ms. Here the GIL is released once per call (a ctypes call).
//
// The runs are grouped in `nsegs` segments (`seg_runs[s]` runs each, in order): one extent each, laid out one
// after another in the file, each starting on `align` (the previous one padded with zeros; an empty one takes one
// block of zeros, as the extent allocator rounds it up), each with its own CRC in `crcs[s]`. So the extents of
// several chunks move in one call and in `stage_size`-byte I/Os, not one small I/O each: at ~140 KB an O_DIRECT
// I/O reached half the disk's bandwidth here, at 1 MiB 0.9 of it. With one segment the bytes on disk are exactly
// the Python loop's: pieces of `stage_size` bytes, the last one padded with zeros to `align`.
// Both return the bytes transferred (>= 0, padding included) or -errno; ns[0] gets the nanoseconds the call took,
// ns[1] those spent in the system calls (the rest is gathering or scattering and checksumming).
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern "C" uint32_t memfit_crc32c(const uint8_t* data, size_t n, uint32_t crc);

namespace {

int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t round_up(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

// Write stage[0:size) at `offset` (size a multiple of align); a short write of whole blocks is continued.
// `*io_ns` gains the time spent in the system calls.
int64_t write_all(int fd, const uint8_t* stage, int64_t size, int64_t offset, int64_t align, int64_t* io_ns) {
    int64_t done = 0, t0 = now_ns();
    while (done < size) {
        ssize_t n = pwrite(fd, stage + done, (size_t)(size - done), offset + done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        if (n == 0 || n % align) return -EIO;
        done += n;
    }
    *io_ns += now_ns() - t0;
    return 0;
}

}  // namespace

extern "C" int64_t memfit_staged_pwrite(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                        const uint8_t* const* ptrs, const int64_t* lens, const int64_t* seg_runs,
                                        int64_t nsegs, int64_t align, uint32_t* crcs, int64_t* ns) {
    ns[1] = 0;
    int64_t t0 = now_ns(), pos = 0, fill = 0, run = 0;  // pos: file bytes written, fill: bytes staged
    for (int64_t s = 0; s < nsegs; s++) {
        uint32_t crc = 0;
        int64_t seg_bytes = 0;
        for (int64_t r = 0; r < seg_runs[s]; r++, run++) {
            int64_t used = 0;
            while (used < lens[run]) {  // gather
                int64_t n = lens[run] - used < stage_size - fill ? lens[run] - used : stage_size - fill;
                memcpy(stage + fill, ptrs[run] + used, (size_t)n);
                crc = memfit_crc32c(stage + fill, (size_t)n, crc);
                fill += n;
                used += n;
                if (fill == stage_size) {
                    int64_t err = write_all(fd, stage, fill, offset + pos, align, ns + 1);
                    if (err) return err;
                    pos += fill;
                    fill = 0;
                }
            }
            seg_bytes += lens[run];
        }
        // the segment's last block: zeros to `align` (fill < stage_size here, and stage_size is a multiple of it)
        int64_t padded = seg_bytes == 0 ? fill + align : round_up(fill, align);
        memset(stage + fill, 0, (size_t)(padded - fill));
        fill = padded;
        if (fill == stage_size) {
            int64_t err = write_all(fd, stage, fill, offset + pos, align, ns + 1);
            if (err) return err;
            pos += fill;
            fill = 0;
        }
        crcs[s] = crc;
    }
    if (fill) {
        int64_t err = write_all(fd, stage, fill, offset + pos, align, ns + 1);
        if (err) return err;
        pos += fill;
    }
    ns[0] = now_ns() - t0;
    return pos;
}

extern "C" int64_t memfit_staged_pread(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                       uint8_t* const* ptrs, const int64_t* lens, const int64_t* seg_runs,
                                       int64_t nsegs, int64_t align, uint32_t* crcs, int64_t* ns) {
    ns[1] = 0;
    int64_t t0 = now_ns(), total = 0;
    for (int64_t s = 0, r = 0; s < nsegs; s++) {  // file bytes: each segment rounded up to align (empty: a block)
        int64_t data = 0;
        for (int64_t i = 0; i < seg_runs[s]; i++) data += lens[r++];
        total += data == 0 ? align : round_up(data, align);
    }
    // the cursor: segment s (its first run `base`, its data and padded bytes), `done` bytes of it consumed, and
    // the current run with `used` bytes of it filled
    int64_t s = 0, base = 0, data = 0, padded = 0, done = 0, run = 0, used = 0;
    uint32_t crc = 0;
    auto enter = [&](int64_t seg) {
        data = 0;
        for (int64_t i = 0; i < seg_runs[seg]; i++) data += lens[base + i];
        padded = data == 0 ? align : round_up(data, align);
        done = used = 0;
        run = base;
        crc = 0;
    };
    if (nsegs) enter(0);
    for (int64_t pos = 0; pos < total;) {
        int64_t size = stage_size < total - pos ? stage_size : total - pos;
        int64_t got = 0, t1 = now_ns();
        while (got < size) {  // a short read is continued; an end of file before `size` is an error
            ssize_t n = pread(fd, stage + got, (size_t)(size - got), offset + pos + got);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return -errno;
            if (n == 0) return -EIO;
            got += n;
        }
        ns[1] += now_ns() - t1;
        for (int64_t off = 0; off < size;) {
            int64_t n;
            if (done < data) {  // scatter (and checksum) into the current run
                while (used == lens[run]) {  // past a finished (or empty) run
                    run++;
                    used = 0;
                }
                n = lens[run] - used < size - off ? lens[run] - used : size - off;
                crc = memfit_crc32c(stage + off, (size_t)n, crc);
                memcpy(ptrs[run] + used, stage + off, (size_t)n);
                used += n;
            } else {  // the zeros after the segment's data: skipped
                n = padded - done < size - off ? padded - done : size - off;
            }
            off += n;
            done += n;
            if (done == padded) {  // the segment is complete: its CRC, and on to the next one
                crcs[s] = crc;
                base += seg_runs[s];
                if (++s < nsegs) enter(s);
            }
        }
        pos += size;
    }
    ns[0] = now_ns() - t0;
    return total;
}
