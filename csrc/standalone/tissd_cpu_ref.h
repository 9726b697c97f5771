// Float64 CPU reference of the quadratic TiSSD forward and backward (token layout, see CONTRACT.md).
// Straight loops over the contract's formulas; used by check_tissd.cu. Plain C++, no CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mmm4rec_ref {

struct Problem {
  int nseq, H, G, P, N, T;
  bool d_skip_delta, dt_softplus, has_E, has_bias, has_D;
  std::vector<int64_t> seq_start;
  std::vector<int32_t> seq_len;
  // inputs (already rounded to the kernel's element type where it matters)
  std::vector<double> x, dt, A, B, C, E, dt_bias, D, dy;  // x, dy [T,H,P]; dt, E [T,H]; B, C [T,G,N]; A... [H]
};

struct Grads {
  std::vector<double> y, dx, ddt, dA, dB, dC, dE, ddt_bias, dD;
};

inline double softplus(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

inline Grads reference(const Problem& pb) {
  const int H = pb.H, G = pb.G, P = pb.P, N = pb.N, T = pb.T, hpg = H / G;
  Grads o;
  o.y.assign(size_t(T) * H * P, 0.0);
  o.dx.assign(size_t(T) * H * P, 0.0);
  o.ddt.assign(size_t(T) * H, 0.0);
  o.dE.assign(size_t(T) * H, 0.0);
  o.dB.assign(size_t(T) * G * N, 0.0);
  o.dC.assign(size_t(T) * G * N, 0.0);
  o.dA.assign(H, 0.0);
  o.ddt_bias.assign(H, 0.0);
  o.dD.assign(H, 0.0);
  for (int s = 0; s < pb.nseq; ++s) {
    const int64_t st = pb.seq_start[s];
    const int L = pb.seq_len[s];
    for (int h = 0; h < H; ++h) {
      const int g = h / hpg;
      auto X = [&](int t, int p) { return pb.x[((st + t) * H + h) * P + p]; };
      auto DY = [&](int t, int p) { return pb.dy[((st + t) * H + h) * P + p]; };
      auto Bv = [&](int t, int k) { return pb.B[((st + t) * G + g) * N + k]; };
      auto Cv = [&](int t, int k) { return pb.C[((st + t) * G + g) * N + k]; };
      std::vector<double> v(L), dl(L), cs(L);
      double run = 0.0;
      for (int t = 0; t < L; ++t) {
        const int64_t i = (st + t) * H + h;
        v[t] = pb.dt[i] * (pb.has_E ? pb.E[i] : 1.0) + (pb.has_bias ? pb.dt_bias[h] : 0.0);
        dl[t] = pb.dt_softplus ? softplus(v[t]) : v[t];
        run += pb.A[h] * dl[t];
        cs[t] = run;
      }
      const double Dh = pb.has_D ? pb.D[h] : 0.0;
      // M_ij = exp(min(cs_i - cs_j, 0)), S_ij = (C_i . B_j) M_ij, j <= i
      std::vector<double> M(size_t(L) * L, 0.0), S(size_t(L) * L, 0.0), Q(size_t(L) * L, 0.0);
      for (int i = 0; i < L; ++i)
        for (int j = 0; j <= i; ++j) {
          double cb = 0.0;
          for (int k = 0; k < N; ++k) cb += Cv(i, k) * Bv(j, k);
          M[i * L + j] = std::exp(std::min(cs[i] - cs[j], 0.0));
          S[i * L + j] = cb * M[i * L + j];
          double q = 0.0;  // dy_i . u_j
          for (int p = 0; p < P; ++p) q += DY(i, p) * dl[j] * X(j, p);
          Q[i * L + j] = q;
        }
      std::vector<double> dDelta(L, 0.0), dcs(L, 0.0);
      for (int i = 0; i < L; ++i) {
        const double si = pb.d_skip_delta ? dl[i] : 1.0;
        for (int p = 0; p < P; ++p) {
          double acc = 0.0, du = 0.0;
          for (int j = 0; j <= i; ++j) acc += S[i * L + j] * dl[j] * X(j, p);  // y_i
          for (int k = i; k < L; ++k) du += S[k * L + i] * DY(k, p);          // du_i = sum_k S_ki dy_k
          const int64_t off = ((st + i) * H + h) * P + p;
          o.y[off] = acc + Dh * si * X(i, p);
          o.dx[off] = dl[i] * du + Dh * si * DY(i, p);
          dDelta[i] += du * X(i, p);
          if (pb.has_D) {
            o.dD[h] += si * X(i, p) * DY(i, p);
            if (pb.d_skip_delta) dDelta[i] += Dh * X(i, p) * DY(i, p);
          }
        }
      }
      for (int i = 0; i < L; ++i)
        for (int j = 0; j <= i; ++j) {
          const double dG = Q[i * L + j] * M[i * L + j];
          for (int k = 0; k < N; ++k) {
            o.dC[((st + i) * G + g) * N + k] += dG * Bv(j, k);
            o.dB[((st + j) * G + g) * N + k] += dG * Cv(i, k);
          }
          const double W = cs[i] - cs[j] <= 0.0 ? Q[i * L + j] * S[i * L + j] : 0.0;
          dcs[i] += W;
          dcs[j] -= W;
        }
      double da = 0.0;
      for (int t = L - 1; t >= 0; --t) {
        da += dcs[t];  // da_t = sum_{i>=t} dcs_i
        dDelta[t] += pb.A[h] * da;
        o.dA[h] += dl[t] * da;
        const double dv = pb.dt_softplus ? dDelta[t] / (1.0 + std::exp(-v[t])) : dDelta[t];
        const int64_t i = (st + t) * H + h;
        o.ddt[i] = dv * (pb.has_E ? pb.E[i] : 1.0);
        o.dE[i] = dv * pb.dt[i];
        o.ddt_bias[h] += dv;
      }
    }
  }
  return o;
}

}  // namespace mmm4rec_ref
