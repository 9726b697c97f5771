// CPU emulation shim (float16), see emulate_check.sh.
#pragma once
struct __half { _Float16 v; };
inline __half __float2half(float f) { return __half{(_Float16)f}; }
inline float __half2float(__half h) { return (float)h.v; }
