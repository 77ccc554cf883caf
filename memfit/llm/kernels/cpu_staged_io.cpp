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
// A read takes each segment's own file offset (`offs`: a sequence's extents need not lie together): a stage's worth
// of them is read with one I/O per stretch contiguous in the file, all submitted at once (Linux AIO) and waited for
// together, then checksummed and scattered as above.
// Both return the bytes transferred (>= 0, padding included) or -errno; ns[0] gets the nanoseconds the call took,
// ns[1] those spent in the system calls (the rest is gathering or scattering and checksumming).
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

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

namespace {

enum { MAX_IOS = 256 };  // a stage of 1 MiB holds at most 256 one-block extents

// One AIO context per thread, made on its first use and destroyed when the thread exits: io_destroy waits for an
// RCU grace period (measured: a set-up and tear-down per call made each swap-in read take ~30 ms here).
struct AioContext {
    aio_context_t ctx = 0;
    bool tried = false, ok = false;
    bool get() {
        if (!tried) {
            tried = true;
            ok = syscall(SYS_io_setup, MAX_IOS, &ctx) == 0;
        }
        return ok;
    }
    void drop() {  // after a failed wait: I/Os may still be in flight; a new context next time
        if (ok) syscall(SYS_io_destroy, ctx);
        ctx = 0;
        ok = tried = false;
    }
    ~AioContext() {
        if (ok) syscall(SYS_io_destroy, ctx);
    }
};
thread_local AioContext aio;

// Read the stage's worth [pos, pos + size) of the segments' concatenated layout (segment s at virtual offset
// virt[s], in the file at offs[s], padded[s] bytes) into stage[0:size): one I/O per stretch that is contiguous in the
// file, all submitted at once with Linux AIO and waited for together (one sleep and one wake-up for the lot: on a
// loaded machine each wake-up waited ~2 ms for a CPU), else one pread each. Returns 0 or -errno.
int64_t read_span(int fd, uint8_t* stage, int64_t pos, int64_t size, const int64_t* offs, const int64_t* virt,
                  const int64_t* padded, int64_t nsegs, int64_t* first, int64_t* io_ns) {
    int64_t file_off[MAX_IOS], stage_off[MAX_IOS], len[MAX_IOS], n = 0;
    while (*first < nsegs && virt[*first] + padded[*first] <= pos) ++*first;  // segments wholly before pos: done
    for (int64_t s = *first; s < nsegs && virt[s] < pos + size; s++) {
        int64_t lo = virt[s] > pos ? virt[s] : pos;
        int64_t hi = virt[s] + padded[s] < pos + size ? virt[s] + padded[s] : pos + size;
        int64_t at = offs[s] + (lo - virt[s]);
        if (n && file_off[n - 1] + len[n - 1] == at) {  // follows the previous stretch in the file: one I/O
            len[n - 1] += hi - lo;
            continue;
        }
        if (n == MAX_IOS) return -EINVAL;
        file_off[n] = at;
        stage_off[n] = lo - pos;
        len[n++] = hi - lo;
    }
    int64_t t0 = now_ns();
    if (n > 1 && aio.get()) {
        aio_context_t ctx = aio.ctx;
        struct iocb cbs[MAX_IOS];
        struct iocb* list[MAX_IOS];
        for (int64_t i = 0; i < n; i++) {
            memset(&cbs[i], 0, sizeof(cbs[i]));
            cbs[i].aio_fildes = (uint32_t)fd;
            cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
            cbs[i].aio_buf = (uint64_t)(uintptr_t)(stage + stage_off[i]);
            cbs[i].aio_nbytes = (uint64_t)len[i];
            cbs[i].aio_offset = file_off[i];
            cbs[i].aio_data = (uint64_t)i;
            list[i] = &cbs[i];
        }
        int64_t err = 0, submitted = 0, reaped = 0;
        while (submitted < n) {
            long got = syscall(SYS_io_submit, ctx, n - submitted, list + submitted);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                err = got < 0 ? -errno : -EIO;
                break;
            }
            submitted += got;
        }
        if (submitted == 0) {  // the context is unusable (e.g. made before a fork): a new one next time, preads now
            aio.drop();
            goto sync;
        }
        struct io_event events[MAX_IOS];
        while (reaped < submitted) {  // every submitted I/O is waited for, even after an error: the stage is reused
            long got = syscall(SYS_io_getevents, ctx, submitted - reaped, submitted - reaped, events, nullptr);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) {
                err = -errno;
                aio.drop();
                break;
            }
            for (long i = 0; i < got; i++) {
                int64_t res = (int64_t)events[i].res;
                if (!err && res != len[events[i].data]) err = res < 0 ? res : -EIO;  // a short read: past the end
            }
            reaped += got;
        }
        *io_ns += now_ns() - t0;
        return err;
    }
sync:
    for (int64_t i = 0; i < n; i++) {  // one I/O, or no AIO here: one pread each
        int64_t got = 0;
        while (got < len[i]) {  // a short read is continued; an end of file before the stretch's end is an error
            ssize_t r = pread(fd, stage + stage_off[i] + got, (size_t)(len[i] - got), file_off[i] + got);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return -errno;
            if (r == 0) return -EIO;
            got += r;
        }
    }
    *io_ns += now_ns() - t0;
    return 0;
}

}  // namespace

extern "C" int64_t memfit_staged_pread(int fd, const int64_t* offs, uint8_t* stage, int64_t stage_size,
                                       uint8_t* const* ptrs, const int64_t* lens, const int64_t* seg_runs,
                                       int64_t nsegs, int64_t align, uint32_t* crcs, int64_t* ns) {
    std::vector<int64_t> virt_(nsegs > 0 ? nsegs : 1), padded_(nsegs > 0 ? nsegs : 1);
    int64_t* virt = virt_.data();
    int64_t* padded = padded_.data();
    ns[1] = 0;
    int64_t t0 = now_ns(), total = 0;
    for (int64_t s = 0, r = 0; s < nsegs; s++) {  // file bytes: each segment rounded up to align (empty: a block)
        int64_t data = 0;
        for (int64_t i = 0; i < seg_runs[s]; i++) data += lens[r++];
        virt[s] = total;
        padded[s] = data == 0 ? align : round_up(data, align);
        total += padded[s];
    }
    // the cursor: segment s (its first run `base`, its data and padded bytes), `done` bytes of it consumed, and
    // the current run with `used` bytes of it filled
    int64_t s = 0, base = 0, data = 0, done = 0, run = 0, used = 0, first = 0;
    uint32_t crc = 0;
    auto enter = [&](int64_t seg) {
        data = 0;
        for (int64_t i = 0; i < seg_runs[seg]; i++) data += lens[base + i];
        done = used = 0;
        run = base;
        crc = 0;
    };
    if (nsegs) enter(0);
    for (int64_t pos = 0; pos < total;) {
        int64_t size = stage_size < total - pos ? stage_size : total - pos;
        int64_t err = read_span(fd, stage, pos, size, offs, virt, padded, nsegs, &first, ns + 1);
        if (err) return err;
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
                n = padded[s] - done < size - off ? padded[s] - done : size - off;
            }
            off += n;
            done += n;
            if (done == padded[s]) {  // the segment is complete: its CRC, and on to the next one
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
