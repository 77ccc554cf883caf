// Shared by the CPU kernels: split [0, n) into one contiguous run per OpenMP thread, so each thread streams its
// part of W (panels, column blocks) sequentially.
#pragma once

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// work(i0, i1) over [0, n): in the calling thread when nthreads <= 1 or n < 2, else one run per thread.
template <typename Work>
void for_runs(int64_t n, int nthreads, const Work& work) {
    if (nthreads <= 1 || n < 2) {
        work(0, n);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int id = 0, nt = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t per = (n + nt - 1) / nt;
        const int64_t i0 = id * per, i1 = i0 + per < n ? i0 + per : n;
        if (i0 < i1) work(i0, i1);
    }
}
