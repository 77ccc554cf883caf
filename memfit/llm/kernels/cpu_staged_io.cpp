// The SSD swap tier's O_DIRECT loop in one call (kernels/staged_io.py): gather KV runs into a page-aligned
// staging buffer, checksum each piece as it is staged (CRC-32C, cpu_crc32c.cpp: the bytes are in the CPU's caches
// then) and write it each time it is full; or read a piece's worth, checksum and scatter it into the runs.
// The same loop in Python (memory/extent_store.py) drops and retakes the GIL around every copy and system call,
// and on a swap thread beside the engine's each retake waits for the engine thread's switch interval: a 144 KiB
// extent took 6-8 ms instead of 0.2 ms. Here the GIL is released once per call (a ctypes call).
//
// The runs are grouped in `nsegs` segments (`seg_runs[s]` runs each, in order): one extent each, laid out one
// after another in the file, each starting on `align` (the previous one padded with zeros; an empty one takes one
// block of zeros, as the extent allocator rounds it up), each with its own CRC in `crcs[s]`. So the extents of
// several chunks move in one call and in large I/Os, not one small I/O each: at ~140 KB an O_DIRECT I/O reached
// half the disk's bandwidth here, at 1 MiB 0.9 of it. The I/Os are pieces of the stage: at depth 2 (the default,
// g_io_depth) its two halves take turns, one gathered or scattered while the other's I/O is in flight (Linux AIO,
// staged_aio.hpp); at depth 1 the whole stage, one I/O at a time. The bytes on disk do not depend on the pieces:
// with one segment they are exactly the Python loop's, the data and then zeros to `align`.
// A read takes each segment's own file offset (`offs`: a sequence's extents need not lie together): a piece's
// worth of them is read with one I/O per stretch contiguous in the file, all submitted at once, then checksummed
// and scattered as above.
// Both return the bytes transferred (>= 0, padding included) or -errno; ns[0] gets the nanoseconds the call took,
// ns[1] those spent in the system calls, waits for the disk included (the rest is gathering or scattering and
// checksumming, which at depth 2 runs while the other half's I/O is in flight).
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <memory>
#include <vector>

extern "C" uint32_t memfit_crc32c(const uint8_t* data, size_t n, uint32_t crc);

#include "staged_aio.hpp"

namespace {

int64_t round_up(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

// How many stage pieces may be in flight at once (memfit_staged_io_depth): 2 splits the stage in halves, and
// while one half is on its way to or from the disk (Linux AIO) the other is gathered and checksummed, or
// scattered and checksummed. Why: with O_DIRECT the disk reads and writes the buffer itself while the thread
// waits, so the copies and checksums of the next piece fit in that wait; one buffer at a time they come on top
// of it (in a serving run a third of the SSD tier's write time was on a CPU, CRC-32C, staging copies and system
// calls: docs/benchmarks.md). 1: the whole stage per I/O, one at a time. A call of at most half the stage is one
// piece, with nothing to overlap, and runs as at depth 1; so does every call where AIO is unavailable, or where a
// half would not be a whole number of blocks or could take more than half the AIO context's events. Set from
// Python, read by the swap threads: atomic.
std::atomic<int> g_io_depth{2};

bool halves_fit(int64_t stage_size, int64_t align) {
    return g_io_depth.load(std::memory_order_relaxed) >= 2 && align > 0 && stage_size % (2 * align) == 0 &&
           stage_size / 2 / align <= MAX_IOS / 2;
}

}  // namespace

extern "C" int64_t memfit_staged_pwrite(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                        const uint8_t* const* ptrs, const int64_t* lens, const int64_t* seg_runs,
                                        int64_t nsegs, int64_t align, uint32_t* crcs, int64_t* ns) {
    ns[1] = 0;
    const int64_t t0 = now_ns();
    int64_t total = 0;  // file bytes: each segment rounded up to align (an empty one: a block)
    for (int64_t s = 0, r = 0; s < nsegs; s++) {
        int64_t data = 0;
        for (int64_t i = 0; i < seg_runs[s]; i++) data += lens[r++];
        total += data == 0 ? align : round_up(data, align);
    }
    // halves only where there is more than one: a single I/O has nothing to overlap (through AIO it took 1.01-1.08x
    // a pwrite's time, benchmarks/swap_tiers.py's memfit-tiny rows)
    const bool two = halves_fit(stage_size, align) && total > stage_size / 2 && aio.get();
    const int64_t piece = two ? stage_size / 2 : stage_size;  // bytes an I/O
    WritePipe out{fd, align, ns + 1, two};
    int cur = 0;  // the half being filled (the whole stage at depth 1)
    uint8_t* buf = stage;
    int64_t pos = 0, fill = 0, run = 0;  // pos: file bytes sent, fill: bytes staged in buf
    auto send = [&]() -> int64_t {  // buf out; at depth 2 on to the other half once its last write is through
        int64_t err = out.put(cur, buf, fill, offset + pos);
        if (err) return err;
        pos += fill;
        fill = 0;
        if (!two) return 0;
        cur ^= 1;
        buf = stage + cur * piece;
        return out.wait(cur);
    };
    for (int64_t s = 0; s < nsegs; s++) {
        uint32_t crc = 0;
        int64_t seg_bytes = 0;
        for (int64_t r = 0; r < seg_runs[s]; r++, run++) {
            int64_t used = 0;
            while (used < lens[run]) {  // gather
                int64_t n = lens[run] - used < piece - fill ? lens[run] - used : piece - fill;
                memcpy(buf + fill, ptrs[run] + used, (size_t)n);
                crc = memfit_crc32c(buf + fill, (size_t)n, crc);
                fill += n;
                used += n;
                if (fill == piece) {
                    int64_t err = send();
                    if (err) return out.drain(), err;
                }
            }
            seg_bytes += lens[run];
        }
        // the segment's last block: zeros to `align` (fill < piece here, and piece is a multiple of it)
        int64_t padded = seg_bytes == 0 ? fill + align : round_up(fill, align);
        memset(buf + fill, 0, (size_t)(padded - fill));
        fill = padded;
        if (fill == piece) {
            int64_t err = send();
            if (err) return out.drain(), err;
        }
        crcs[s] = crc;
    }
    int64_t err = fill ? out.put(cur, buf, fill, offset + pos) : 0;
    pos += fill;
    int64_t drained = out.drain();
    if (err || drained) return err ? err : drained;
    ns[0] = now_ns() - t0;
    return pos;
}

namespace {
// Read a stage's worth at depth 1: the span's I/Os submitted together and waited for, or one pread for one I/O
// or without AIO. Returns 0 or -errno.
int64_t read_span(int fd, uint8_t* stage, int64_t pos, int64_t size, const int64_t* offs, const int64_t* virt,
                  const int64_t* padded, int64_t nsegs, int64_t* first, int64_t* io_ns) {
    Span sp;
    int64_t err = plan_span(sp, pos, size, offs, virt, padded, nsegs, first);
    if (err) return err;
    if (sp.n > 1 && aio.get()) {
        ReadPipe pipe{fd, io_ns};
        pipe.submit(0, sp, stage);
        return pipe.wait(0);
    }
    return pread_span(fd, sp, 0, stage, io_ns);
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
    // Depth 2: the stage's halves alternate; the next half's reads are in flight while this one is scattered.
    const bool two = halves_fit(stage_size, align) && total > stage_size / 2 && aio.get();  // as in the write
    const int64_t piece = two ? stage_size / 2 : stage_size;
    struct Pipeline {  // on the heap (~45 KiB): swap threads' stacks need not be large
        ReadPipe pipe;
        Span spans[2];
    };
    std::unique_ptr<Pipeline> pl(two ? new Pipeline{ReadPipe{fd, ns + 1}, {}} : nullptr);
    int cur = 0;
    if (two) {  // total > piece here
        int64_t err = plan_span(pl->spans[0], 0, piece, offs, virt, padded, nsegs, &first);
        if (err) return err;
        pl->pipe.submit(0, pl->spans[0], stage);
    }
    for (int64_t pos = 0; pos < total; cur ^= (int)two) {
        const int64_t size = piece < total - pos ? piece : total - pos, next = pos + size;
        uint8_t* buf = stage + cur * piece;
        int64_t err;
        if (two) {
            ReadPipe& pipe = pl->pipe;
            if (next < total) {  // the following piece's reads go out before this one is waited for
                const int64_t nsize = piece < total - next ? piece : total - next;
                err = plan_span(pl->spans[cur ^ 1], next, nsize, offs, virt, padded, nsegs, &first);
                if (err) return pipe.wait(cur), err;
                pipe.submit(cur ^ 1, pl->spans[cur ^ 1], stage + (cur ^ 1) * piece);
            }
            err = pipe.wait(cur);
            if (err) return pipe.wait(cur ^ 1), err;
        } else {
            err = read_span(fd, buf, pos, size, offs, virt, padded, nsegs, &first, ns + 1);
            if (err) return err;
        }
        for (int64_t off = 0; off < size;) {
            int64_t n;
            if (done < data) {  // scatter (and checksum) into the current run
                while (used == lens[run]) {  // past a finished (or empty) run
                    run++;
                    used = 0;
                }
                n = lens[run] - used < size - off ? lens[run] - used : size - off;
                crc = memfit_crc32c(buf + off, (size_t)n, crc);
                memcpy(ptrs[run] + used, buf + off, (size_t)n);
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
        pos = next;
    }
    ns[0] = now_ns() - t0;
    return total;
}

// The stage pieces in flight at once (1 or 2; g_io_depth above), or -1 to leave it; returns the previous depth.
extern "C" int memfit_staged_io_depth(int depth) {
    return depth >= 1 ? g_io_depth.exchange(depth > 2 ? 2 : depth) : g_io_depth.load();
}
