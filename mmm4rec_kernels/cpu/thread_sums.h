// Shared by the native CPU kernels: per-thread partial sums (double) reduced in a fixed thread order, so a weight
// gradient does not depend on how the threads were scheduled; and the vector exp declarations below.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

// index of the calling thread inside an OpenMP parallel region (0 without OpenMP)
inline int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// glibc's libmvec has vector versions of exp / expf and log / logf (_ZGV*_exp*, _ZGV*_log*); GCC calls them from
// vectorised loops only for functions declared with the simd attribute, which <math.h> does only under
// __FAST_MATH__ (-ffast-math).  The library is built without -ffast-math (it assumes no NaN / inf, and links
// crtfastmath.o, which turns on flush-to-zero for the whole process on load), so the four functions are declared
// here.  libmvec handles every input, inf / NaN / overflow included.  Other compilers and C libraries: scalar calls.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__FAST_MATH__)
extern "C" {
float expf(float) noexcept __attribute__((__simd__("notinbranch")));
double exp(double) noexcept __attribute__((__simd__("notinbranch")));
float logf(float) noexcept __attribute__((__simd__("notinbranch")));
double log(double) noexcept __attribute__((__simd__("notinbranch")));
}
#endif

// out[e] = sum over t < nt of partials[t * count + e]   (e < count)
template <typename T>
inline void sum_thread_partials(const std::vector<double>& partials, int nt, int64_t count, T* out) {
    for (int64_t e = 0; e < count; ++e) {
        double acc = 0.0;
        for (int t = 0; t < nt; ++t) acc += partials[size_t(t) * count + e];
        out[e] = T(acc);
    }
}
