// Activations shared by the native CPU kernels, overflow-free at any input and vectorisable (no branches: both
// sides are computed and one is selected).
#pragma once
#include <cmath>

// sigmoid s = sigmoid(p) and its complement c = 1 - s: with e = exp(-|p|) in (0, 1],
//   p >= 0: s = 1 / (1 + e), c = e / (1 + e);   p < 0: s = e / (1 + e), c = 1 / (1 + e)
// (exp(-p) itself overflows to inf for p < -88.7 in fp32, and inf * 0 = NaN in a gradient).  p = +-inf / NaN give
// what torch gives.
template <typename T>
inline void sigmoid_pair(T p, T& s, T& c) {
    const T e = std::exp(-std::abs(p));
    const T r = T(1) / (T(1) + e);
    const bool pos = p >= T(0);
    s = pos ? r : e * r;
    c = pos ? e * r : r;
}

template <typename T>
inline T silu_of(T p) {                         // p * sigmoid(p)
    T s, c;
    sigmoid_pair(p, s, c);
    return p * s;
}

template <typename T>
inline T silu_grad(T p) {                       // d SiLU / dp = s (1 + p (1 - s)), s = sigmoid(p)
    T s, c;
    sigmoid_pair(p, s, c);
    return s * (T(1) + p * c);
}

template <typename T>
inline T softplus_of(T v) {                     // torch's F.softplus (beta 1, threshold 20)
    return v > T(20) ? v : std::log1p(std::exp(v));
}
