// Shared by the native CPU kernels: per-thread partial sums (double) reduced in a fixed thread order, so a weight
// gradient does not depend on how the threads were scheduled.
#pragma once
#include <cstdint>
#include <vector>

// out[e] = sum over t < nt of partials[t * count + e]   (e < count)
template <typename T>
inline void sum_thread_partials(const std::vector<double>& partials, int nt, int64_t count, T* out) {
    for (int64_t e = 0; e < count; ++e) {
        double acc = 0.0;
        for (int t = 0; t < nt; ++t) acc += partials[size_t(t) * count + e];
        out[e] = T(acc);
    }
}
