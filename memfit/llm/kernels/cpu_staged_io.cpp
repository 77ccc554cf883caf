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
// several chunks move in one call and in large I/Os, not one small I/O each: at ~140 KB a lone O_DIRECT I/O
// reached half the disk's bandwidth here, at 1 MiB 0.9 of it. The I/Os are pieces of the stage: at depth 4 (the
// default, g_io_depth) its quarters take turns, one gathered or scattered while the others' I/Os are in flight
// (Linux AIO, staged_aio.hpp); at depth 2 its halves; at depth 1 the whole stage, one I/O at a time. The bytes on
// disk do not depend on the pieces: with one segment they are exactly the Python loop's, the data and then zeros
// to `align`.
// A read takes each segment's own file offset (`offs`: a sequence's extents need not lie together): a piece's
// worth of them is read with one I/O per stretch contiguous in the file, all submitted at once, then checksummed
// and scattered as above.
// Both return the bytes transferred (>= 0, padding included) or -errno; ns[0] gets the nanoseconds the call took,
// ns[1] those spent in the system calls, waits for the disk included (the rest is gathering or scattering and
// checksumming, which at depth 2 or 4 runs while other pieces' I/Os are in flight).
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <memory>
#include <vector>

extern "C" uint32_t memfit_crc32c(const uint8_t* data, size_t n, uint32_t crc);

#include "staged_aio.hpp"

namespace {

int64_t round_up(int64_t n, int64_t align) { return (n + align - 1) / align * align; }

// The file bytes of segment s (its runs' data rounded up to align; an empty one takes a block), whose first run is
// `*run` (advanced past its runs).
int64_t segment_extent(const int64_t* lens, const int64_t* seg_runs, int64_t s, int64_t* run, int64_t align) {
    int64_t data = 0;
    for (int64_t i = 0; i < seg_runs[s]; i++) data += lens[(*run)++];
    return data == 0 ? align : round_up(data, align);
}

// How many stage pieces may be in flight at once (memfit_staged_io_depth): at depth n (4, the default, or 2) the
// stage is cut in n pieces, and while some are on their way to or from the disk (Linux AIO) another is gathered
// and checksummed, or scattered and checksummed. Why: with O_DIRECT the disk reads and writes the buffer itself
// while the thread waits, so the copies and checksums of the next piece fit in that wait; one buffer at a time
// they come on top of it (in a serving run a third of the SSD tier's write time was on a CPU, CRC-32C, staging
// copies and system calls: docs/benchmarks.md). 1: the whole stage per I/O, one at a time. A call of at most one
// piece has nothing to overlap and runs as at depth 1; so does every call where AIO is unavailable, or where a
// piece would not be a whole number of blocks or the stage holds more blocks than the AIO context has events.
// Set from Python, read by the swap threads: atomic.
std::atomic<int> g_io_depth{4};

// The pieces a call of `total` file bytes cuts its stage into: the depth, or 1.
int pieces(int64_t stage_size, int64_t align, int64_t total) {
    const int n = g_io_depth.load(std::memory_order_relaxed);
    if (n < 2 || align <= 0 || stage_size % (n * align) || stage_size / align > MAX_IOS || total <= stage_size / n)
        return 1;
    return aio.get() ? n : 1;
}

}  // namespace

extern "C" int64_t memfit_staged_pwrite(int fd, int64_t offset, uint8_t* stage, int64_t stage_size,
                                        const uint8_t* const* ptrs, const int64_t* lens, const int64_t* seg_runs,
                                        int64_t nsegs, int64_t align, uint32_t* crcs, int64_t* ns) {
    ns[1] = 0;
    const int64_t t0 = now_ns();
    int64_t total = 0;  // file bytes
    for (int64_t s = 0, r = 0; s < nsegs; s++) total += segment_extent(lens, seg_runs, s, &r, align);
    const int np = pieces(stage_size, align, total);
    const int64_t piece = stage_size / np;  // bytes an I/O
    WritePipe out{fd, align, ns + 1, np > 1};
    int cur = 0;  // the piece being filled (the whole stage at depth 1)
    uint8_t* buf = stage;
    int64_t pos = 0, fill = 0, run = 0;  // pos: file bytes sent, fill: bytes staged in buf
    auto send = [&]() -> int64_t {  // buf out; then on to the next piece once its last write is through
        int64_t err = out.put(cur, buf, fill, offset + pos);
        if (err) return err;
        pos += fill;
        fill = 0;
        if (np == 1) return 0;
        cur = (cur + 1) % np;
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
        ReadPipe pipe{fd, io_ns, MAX_IOS};
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
    for (int64_t s = 0, r = 0; s < nsegs; s++) {  // each segment's place in the concatenated layout
        virt[s] = total;
        padded[s] = segment_extent(lens, seg_runs, s, &r, align);
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
    // Depth n > 1: the stage's n pieces take turns; while one is scattered the reads of the next n - 1 are in flight.
    const int np = pieces(stage_size, align, total);
    const int64_t piece = stage_size / np;
    struct Pipeline {  // on the heap (~40 KiB): swap threads' stacks need not be large
        ReadPipe pipe;
        Span spans[MAX_SLOTS];
    };
    std::unique_ptr<Pipeline> pl(np > 1 ? new Pipeline{ReadPipe{fd, ns + 1, MAX_IOS / np}, {}} : nullptr);
    int64_t planned = 0;  // file bytes whose reads are submitted
    auto submit_next = [&](int slot) -> int64_t {  // the next piece's reads into `slot`, if any are left
        if (planned >= total) return 0;
        const int64_t size = piece < total - planned ? piece : total - planned;
        int64_t err = plan_span(pl->spans[slot], planned, size, offs, virt, padded, nsegs, &first);
        if (err) return err;
        pl->pipe.submit(slot, pl->spans[slot], stage + slot * piece);
        planned += size;
        return 0;
    };
    auto drain = [&]() {  // every slot's reads complete (after an error: the stage goes back to its pool)
        for (int i = 0; i < np; i++) pl->pipe.wait(i);
    };
    for (int i = 0; i < np && pl; i++) {
        int64_t err = submit_next(i);
        if (err) return drain(), err;
    }
    int cur = 0;
    for (int64_t pos = 0; pos < total; cur = (cur + 1) % np) {
        const int64_t size = piece < total - pos ? piece : total - pos, next = pos + size;
        uint8_t* buf = stage + cur * piece;
        int64_t err;
        if (np > 1) {
            err = pl->pipe.wait(cur);
            if (err) return drain(), err;
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
        if (np > 1) {  // this piece is free again: the reads of the one n on
            err = submit_next(cur);
            if (err) return drain(), err;
        }
        pos = next;
    }
    ns[0] = now_ns() - t0;
    return total;
}

// The stage pieces in flight at once (1, 2 or 4; g_io_depth above; anything else leaves it); returns the previous
// depth.
extern "C" int memfit_staged_io_depth(int depth) {
    return depth == 1 || depth == 2 || depth == 4 ? g_io_depth.exchange(depth) : g_io_depth.load();
}
