// The SSD tier's Linux AIO for cpu_staged_io.cpp (its only includer; a .hpp so that build.py's *.h glob does not
// put it in the AVX-512 library's cache key): each thread's AIO context, and the writes and reads of up to
// MAX_SLOTS stage pieces in flight at once, so that one piece is gathered or scattered (and checksummed) while the
// others' I/Os run. The disk moves an O_DIRECT buffer itself while the thread waits, so those copies fit in the
// wait.
#pragma once

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

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

// Wait for at least `min` events of the context into `ev` (up to `max`); returns the count or -errno (the
// context is dropped then: io_destroy waits for the I/Os still in flight, and a new context is made next time).
long reap(struct io_event* ev, long min, long max, int64_t* io_ns) {
    int64_t t0 = now_ns();
    long got;
    do got = syscall(SYS_io_getevents, aio.ctx, min, max, ev, nullptr);
    while (got < 0 && errno == EINTR);
    *io_ns += now_ns() - t0;
    if (got < 0) {
        got = -errno;
        aio.drop();
    }
    return got;
}

// The pieces a stage may be cut into, each with its own I/O in flight (memfit_staged_io_depth: 1, 2 or 4).
enum { MAX_SLOTS = 4 };

// The writes of a stage's pieces (slots): put() sends a piece (asynchronously where `async`), wait() sees a
// slot's write through before its piece is filled again.
struct WritePipe {
    int fd;
    int64_t align;
    int64_t* io_ns;
    bool async;
    struct iocb cb[MAX_SLOTS] = {};
    const uint8_t* buf[MAX_SLOTS] = {};
    int64_t want[MAX_SLOTS] = {}, got[MAX_SLOTS] = {}, at[MAX_SLOTS] = {};
    bool busy[MAX_SLOTS] = {}, done[MAX_SLOTS] = {};

    bool others_busy(int i) const {
        for (int j = 0; j < MAX_SLOTS; j++)
            if (j != i && busy[j]) return true;
        return false;
    }
    int64_t put(int i, const uint8_t* b, int64_t size, int64_t offset) {
        if (async) {
            memset(&cb[i], 0, sizeof(cb[i]));
            cb[i].aio_fildes = (uint32_t)fd;
            cb[i].aio_lio_opcode = IOCB_CMD_PWRITE;
            cb[i].aio_buf = (uint64_t)(uintptr_t)b;
            cb[i].aio_nbytes = (uint64_t)size;
            cb[i].aio_offset = offset;
            cb[i].aio_data = (uint64_t)i;
            struct iocb* one = &cb[i];
            int64_t t0 = now_ns();
            long r;
            do r = syscall(SYS_io_submit, aio.ctx, 1, &one);
            while (r < 0 && errno == EINTR);
            *io_ns += now_ns() - t0;
            if (r == 1) {
                busy[i] = true, done[i] = false, buf[i] = b, want[i] = size, at[i] = offset;
                return 0;
            }
            // refused: this write and the rest synchronous; a context made before a fork (EINVAL) is dropped, where
            // nothing else is in flight on it, for a new one next time (a refusal of the request, e.g. EBADF, keeps
            // it: a context's set-up and tear-down cost ~30 ms)
            if (r < 0 && errno == EINVAL && !others_busy(i)) aio.drop();
            async = false;
        }
        return write_all(fd, b, size, offset, align, io_ns);
    }
    // Slot i's write complete (a short write of whole blocks is finished synchronously), or -errno.
    int64_t wait(int i) {
        if (!busy[i]) return 0;
        while (!done[i]) {
            struct io_event ev[MAX_SLOTS];
            long n = reap(ev, 1, MAX_SLOTS, io_ns);
            if (n < 0) {
                for (bool& b : busy) b = false;
                return n;
            }
            for (long k = 0; k < n; k++) done[ev[k].data] = true, got[ev[k].data] = (int64_t)ev[k].res;
        }
        busy[i] = false;
        if (got[i] < 0) return got[i];
        if (got[i] == 0 || got[i] % align) return -EIO;
        return got[i] < want[i] ? write_all(fd, buf[i] + got[i], want[i] - got[i], at[i] + got[i], align, io_ns) : 0;
    }
    int64_t drain() {  // every slot's write through (after an error too: the stage goes back to its pool)
        int64_t first = 0;
        for (int i = 0; i < MAX_SLOTS; i++) {
            int64_t e = wait(i);
            if (e && !first) first = e;
        }
        return first;
    }
};

// A stage piece's reads: one I/O per stretch contiguous in the file.
struct Span {
    int64_t n = 0, file_off[MAX_IOS], stage_off[MAX_IOS], len[MAX_IOS];
};

// The I/Os of [pos, pos + size) of the segments' concatenated layout (segment s at virtual offset virt[s], in the
// file at offs[s], padded[s] bytes), into a buffer's [0, size). Returns 0 or -EINVAL (more stretches than MAX_IOS).
int64_t plan_span(Span& sp, int64_t pos, int64_t size, const int64_t* offs, const int64_t* virt,
                  const int64_t* padded, int64_t nsegs, int64_t* first) {
    sp.n = 0;
    while (*first < nsegs && virt[*first] + padded[*first] <= pos) ++*first;  // segments wholly before pos: done
    for (int64_t s = *first; s < nsegs && virt[s] < pos + size; s++) {
        int64_t lo = virt[s] > pos ? virt[s] : pos;
        int64_t hi = virt[s] + padded[s] < pos + size ? virt[s] + padded[s] : pos + size;
        int64_t at = offs[s] + (lo - virt[s]);
        if (sp.n && sp.file_off[sp.n - 1] + sp.len[sp.n - 1] == at) {  // follows the previous stretch: one I/O
            sp.len[sp.n - 1] += hi - lo;
            continue;
        }
        if (sp.n == MAX_IOS) return -EINVAL;
        sp.file_off[sp.n] = at;
        sp.stage_off[sp.n] = lo - pos;
        sp.len[sp.n++] = hi - lo;
    }
    return 0;
}

// The span's I/Os [from, n) into buf with one pread each (a short read is continued; an end of file before the
// stretch's end is an error). Returns 0 or -errno.
int64_t pread_span(int fd, const Span& sp, int64_t from, uint8_t* buf, int64_t* io_ns) {
    int64_t t0 = now_ns();
    for (int64_t i = from; i < sp.n; i++) {
        int64_t got = 0;
        while (got < sp.len[i]) {
            ssize_t r = pread(fd, buf + sp.stage_off[i] + got, (size_t)(sp.len[i] - got), sp.file_off[i] + got);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return -errno;
            if (r == 0) return -EIO;
            got += r;
        }
    }
    *io_ns += now_ns() - t0;
    return 0;
}

// The reads of up to MAX_SLOTS spans in flight at once (Linux AIO), each into its own piece of the stage; their
// I/Os share MAX_IOS control blocks (a piece of a stage cut in n has at most MAX_IOS / n I/Os: one per block at
// worst, and a stage cut in pieces holds at most MAX_IOS blocks, cpu_staged_io.cpp's pieces()). submit() sends a
// span's I/Os (all at once: one sleep and one wake-up for the lot, where on a loaded machine each wake-up waited
// ~2 ms for a CPU); wait() returns once all of a span's I/Os are complete. Where the context refuses them, the
// span is read with pread instead.
struct ReadPipe {
    int fd;
    int64_t* io_ns;
    int per_slot;  // control blocks a slot: MAX_IOS / pieces
    struct iocb cbs[MAX_IOS] = {};
    const Span* span[MAX_SLOTS] = {};
    int64_t pending[MAX_SLOTS] = {}, err[MAX_SLOTS] = {};

    int64_t in_flight() const {
        int64_t n = 0;
        for (int64_t p : pending) n += p;
        return n;
    }
    void submit(int i, const Span& sp, uint8_t* buf) {
        span[i] = &sp, pending[i] = 0, err[i] = 0;
        if (sp.n > per_slot) {  // not reached: plan_span's pieces hold at most per_slot blocks
            err[i] = -EINVAL;
            return;
        }
        struct iocb* list[MAX_IOS];
        for (int64_t k = 0; k < sp.n; k++) {
            struct iocb& cb = cbs[i * per_slot + k];
            memset(&cb, 0, sizeof(cb));
            cb.aio_fildes = (uint32_t)fd;
            cb.aio_lio_opcode = IOCB_CMD_PREAD;
            cb.aio_buf = (uint64_t)(uintptr_t)(buf + sp.stage_off[k]);
            cb.aio_nbytes = (uint64_t)sp.len[k];
            cb.aio_offset = sp.file_off[k];
            cb.aio_data = (uint64_t)i << 32 | (uint64_t)k;
            list[k] = &cb;
        }
        int64_t t0 = now_ns(), submitted = 0;
        int refused = 0;
        while (submitted < sp.n) {
            long got = syscall(SYS_io_submit, aio.ctx, sp.n - submitted, list + submitted);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                refused = got < 0 ? errno : EAGAIN;
                break;
            }
            submitted += got;
        }
        *io_ns += now_ns() - t0;
        if (submitted < sp.n) {  // the rest (or all) with pread; a context made before a fork (EINVAL) is dropped,
            // where no other span's reads are on it, for a new one next time
            if (submitted == 0 && refused == EINVAL && in_flight() == 0) aio.drop();
            int64_t e = pread_span(fd, sp, submitted, buf, io_ns);
            if (e && !err[i]) err[i] = e;
        }
        pending[i] = submitted;
    }
    int64_t wait(int i) {  // every submitted I/O is waited for, even after an error: the buffer is reused
        while (pending[i] > 0) {
            struct io_event ev[MAX_IOS];
            long n = reap(ev, pending[i], MAX_IOS, io_ns);  // one wake-up for the whole span
            if (n < 0) {
                for (int64_t& p : pending) p = 0;
                return n;
            }
            for (long k = 0; k < n; k++) {
                const int j = (int)(ev[k].data >> 32);
                const int64_t res = (int64_t)ev[k].res, want = span[j]->len[ev[k].data & 0xffffffffu];
                pending[j]--;
                if (!err[j] && res != want) err[j] = res < 0 ? res : -EIO;  // a short read: past the end
            }
        }
        return err[i];
    }
};

}  // namespace
