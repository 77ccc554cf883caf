// The SSD swap tier's O_DIRECT loop in one call (kernels/staged_io.py): gather a sequence's KV runs into a
// page-aligned staging buffer, checksum each staged piece (CRC-32C, cpu_crc32c.cpp) and pwrite it; or pread
// pieces, checksum them and scatter them into the runs. The same loop in Python (memory/extent_store.py) drops
// and retakes the GIL around every copy and system call, and on a swap thread beside the engine's each retake
// waits for the engine thread's switch interval: a 144 KiB extent took 6-8 ms instead of 0.2 ms. Here the
// GIL is released once for the whole extent (a ctypes call). The bytes on disk are exactly the Python loop's:
// pieces of `stage_size` bytes, the last one padded with zeros to `align`.
// Both return the bytes transferred (>= 0, padding included) or -errno; `*crc` is continued over the data
// bytes and `*ns` gets the nanoseconds the call took.
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

}  // namespace

extern "C" int64_t memfit_staged_pwrite(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                        const uint8_t* const* ptrs, const int64_t* lens, int64_t count,
                                        int64_t align, uint32_t* crc, int64_t* ns) {
    int64_t t0 = now_ns(), pos = 0, run = 0, used = 0;  // run: the current source, used: its bytes staged so far
    while (run < count) {
        int64_t fill = 0;
        while (run < count && fill < stage_size) {  // gather
            int64_t n = lens[run] - used < stage_size - fill ? lens[run] - used : stage_size - fill;
            memcpy(stage + fill, ptrs[run] + used, (size_t)n);
            fill += n;
            used += n;
            if (used == lens[run]) {
                run++;
                used = 0;
            }
        }
        if (fill == 0) break;
        *crc = memfit_crc32c(stage, (size_t)fill, *crc);
        int64_t size = (fill + align - 1) / align * align;
        memset(stage + fill, 0, (size_t)(size - fill));
        int64_t done = 0;
        while (done < size) {  // a short write of whole blocks is continued
            ssize_t n = pwrite(fd, stage + done, (size_t)(size - done), offset + pos + done);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return -errno;
            if (n == 0 || n % align) return -EIO;
            done += n;
        }
        pos += size;
    }
    *ns = now_ns() - t0;
    return pos;
}

extern "C" int64_t memfit_staged_pread(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                       uint8_t* const* ptrs, const int64_t* lens, int64_t count,
                                       int64_t align, uint32_t* crc, int64_t* ns) {
    int64_t t0 = now_ns(), pos = 0, run = 0, used = 0, left = 0;
    for (int64_t i = 0; i < count; i++) left += lens[i];
    while (left > 0) {
        int64_t padded = (left + align - 1) / align * align;
        int64_t size = stage_size < padded ? stage_size : padded;
        int64_t take = size < left ? size : left;
        int64_t got = 0;
        while (got < take) {  // a short read is continued; an end of file before `take` is an error
            ssize_t n = pread(fd, stage + got, (size_t)(size - got), offset + pos + got);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return -errno;
            if (n == 0) return -EIO;
            got += n;
        }
        *crc = memfit_crc32c(stage, (size_t)take, *crc);
        int64_t off = 0;
        while (off < take) {  // scatter
            int64_t n = lens[run] - used < take - off ? lens[run] - used : take - off;
            memcpy(ptrs[run] + used, stage + off, (size_t)n);
            off += n;
            used += n;
            if (used == lens[run]) {
                run++;
                used = 0;
            }
        }
        pos += size;
        left -= take;
    }
    *ns = now_ns() - t0;
    return pos;
}
