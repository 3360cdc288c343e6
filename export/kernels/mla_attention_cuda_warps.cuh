// The warp-tile attend kernel (attend_warps_kernel), its PTX wrappers (mma.sync, ldmatrix, cp.async groups)
// and the hardware self-check of their fragment layouts (fragments_kernel).
//
// Not a stand-alone header: mla_attention_cuda.cu includes it once, inside namespace mla_zoo::cuda::{anonymous},
// after the pieces both attend kernels share (Dims, AttendArgs, Plan, cp_async16, the tile loaders), and
// builds it as CUDA or, for the CPU emulation, as C++ (cuda_emulation.h).
#pragma once

// ---------------------------------------------------------------------------------------------
// 2b. attend, warp tiles (float16, tensor cores through mma.sync; r + KR <= 128): one block per
//     (split, row block of 16 rows, sequence) as above, but each WARP streams its own cache tiles of
//     kSlots slots (tiles warp, warp + warps, ... of the split) through its own cp.async ring, with its
//     own online softmax and its own fp32 output accumulator in registers: no block barrier until the
//     split's end, where the warps' (max, sum, o) are combined through shared memory.
// ---------------------------------------------------------------------------------------------

// Fragments of mma.m16n8k16 (f16 inputs, f32 accumulators), per lane with g = lane / 4, t = lane % 4
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"; each uint32_t holds two halves, the first one low):
//   A [16 x 16] (row):  a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]
//                       a[2] = A[g][2t+8, +9]   a[3] = A[g+8][2t+8, +9]
//   B [16 x 8] (col):   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C, D [16 x 8] f32:  c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4 loads four 8x8 b16 matrices from shared memory, lanes 8i..8i+7 giving the addresses of
// matrix i's 8 rows (16 bytes each); lane l gets in r[i] row l/4, elements 2(l%4), 2(l%4)+1 of matrix i
// (.trans: of its transpose, i.e. column l/4, rows 2(l%4), 2(l%4)+1): exactly a b[] register above when
// the matrix is stored [n][k] (plain) or [k][n] (.trans).

// d += a . b
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::mma_m16n8k16(d, a, b);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// r = four 8x8 matrices; `row`: this lane's row address (shared memory, 16-byte aligned)
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __half* row) {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::ldmatrix_x4(r, row, false);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __half* row) {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::ldmatrix_x4(r, row, true);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// two floats -> one .f16x2 register (lo in the low half)
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
#ifdef MLA_ZOO_CUDA_EMULATION
  return emulation::pack_halves(__float2half_rn(lo), __float2half_rn(hi));
#else
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#endif
}

// Byte offsets of the warps kernel's shared memory (host and device). The tile rings (per warp: ring
// tiles [slots, ld] and their attention_mask slots) and the register-capped build's query rows [16, ld]
// (after the rings) are dead once every warp is done, and the combine at the split's end reuses the same bytes.
struct WarpSmemLayout {
  size_t kv_stride, mask, mask_stride, ring_stride;  // warp w's ring at w * ring_stride: tiles, then masks
  size_t q;                                          // the query rows (q_shared only)
  size_t o, m, l, row_max, row_sum, total;           // the combine
};

__host__ __device__ inline WarpSmemLayout warp_smem_layout(int warps, int slots, int ld, int ldo, int ring,
                                                           bool q_shared) {
  WarpSmemLayout L{};
  L.kv_stride = align128(static_cast<size_t>(slots) * ld * 2);
  L.mask_stride = align128(static_cast<size_t>(slots) * 8);
  L.mask = ring * L.kv_stride;
  L.ring_stride = L.mask + ring * L.mask_stride;
  L.q = warps * L.ring_stride;
  const size_t rings = L.q + (q_shared ? static_cast<size_t>(16) * ld * 2 : 0);
  size_t at = 0;
  L.o = at, at = align128(at + static_cast<size_t>(warps) * 16 * ldo * 4);  // per warp o [16, ldo] f32
  L.m = at, at = align128(at + static_cast<size_t>(warps) * 16 * 4);        // per warp row max, then its weight
  L.l = at, at = align128(at + static_cast<size_t>(warps) * 16 * 4);        // per warp row sum
  L.row_max = at, at = align128(at + 16 * 4);                              // the block's
  L.row_sum = at, at = align128(at + 16 * 4);
  L.total = max(rings, at);
  return L;
}

// A kernel's register cap (__maxnreg__, CUDA >= 12.4; elsewhere the compiler's choice).
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define MLA_MAX_REGISTERS(n) __maxnreg__(n)
#else
#define MLA_MAX_REGISTERS(n)
#endif

// a slot's offset from a tile's first slot, clamped to [-1, slots]: the same order against 0..slots - 1
template <typename I>  // int64_t, or int (the capped build's offsets)
__device__ __forceinline__ int tile_offset(I n, int slots) {
  return static_cast<int>(min(max(n, static_cast<I>(-1)), static_cast<I>(slots)));
}

// Registers per thread of the register-capped build (Plan::max_registers): 65536 / (2 blocks x 256 threads),
// so that two 8-warp (four 4-warp) blocks can be resident per SM where their shared memory fits (the
// built-in build's 166 allow one 8-warp block, three 4-warp ones).
constexpr int kCappedRegisters = kMaxRegistersCapped;

// kSlots: slots per warp tile (16, 32 or 64); kKSteps >= ldq / 16 (k-steps of the scores); kO16 >= r16 / 16
// (16-column pairs of n8 tiles of the output). The loops over them are unrolled, so the fragment arrays
// stay in registers; steps past the call's dims are skipped. Registers: at most 168 per thread up to
// r16 = 96 (65536 / (3 blocks x 128 threads), rounded down to 8: three 4-warp blocks per SM; ptxas -v
// on sm_90: 166 at SmolLM2-MLA's dims without the cap 184, no spills either way), else the compiler's
// choice (~204 at r16 = 128). kCapped (r16 <= 96 only): at most kCappedRegisters; to get there without
// spilling, the queries' A fragments (32 registers at ldq = 128) are not held for the whole split but
// read from shared memory with one ldmatrix per k-step of every tile, and the ring offsets and the rows'
// own slots are 32-bit (export/kernels/README.md lists ptxas's counts per build).
template <int kSlots, int kKSteps, int kO16, bool kCapped>
__global__ void MLA_MAX_REGISTERS(kCapped ? kCappedRegisters : kO16 <= 6 ? 168 : 255)
    attend_warps_kernel(Dims d, AttendArgs<__half> a) {
  MLA_DYNAMIC_SMEM(unsigned char, smem);
  constexpr int kN8 = kSlots / 8;  // n8 tiles of a warp tile's scores
  constexpr bool kQShared = kCapped;  // the queries' fragments from shared memory, per tile
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int g = lane / 4, t4 = lane % 4;  // the fragment coordinates
  const WarpSmemLayout L = warp_smem_layout(warps, kSlots, a.ld, a.ldo, a.ring, kQShared);
  // the ring's byte offsets (capped build: in 32 bits, registers it is short of; they are < 228 KB)
  using Offset = std::conditional_t<kCapped, int, size_t>;
  const Offset kv_stride = static_cast<Offset>(L.kv_stride), mask_at = static_cast<Offset>(L.mask),
               mask_stride = static_cast<Offset>(L.mask_stride);
  unsigned char* ring = smem + warp * static_cast<Offset>(L.ring_stride);
  auto kv_buf = [&](int i) { return reinterpret_cast<__half*>(ring + i * kv_stride); };
  auto mk_buf = [&](int i) { return reinterpret_cast<int64_t*>(ring + mask_at + i * mask_stride); };
  const Team team{lane, kWarp, kSlots};

  const int64_t split = blockIdx.x, rb = blockIdx.y, b = blockIdx.z;
  const int64_t rows = d.S * d.H, row0 = rb * 16;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(16), rows - row0));
  const int64_t limit = d.P + (row0 + nrows - 1) / d.H + 1;  // causal: no row of the block sees a slot >= limit
  const int64_t t_begin = split * a.split_len;
  const int64_t t_end = min(min(d.T, t_begin + a.split_len), limit);
  const bool copy_past = d.copy && rb == 0;  // this block's rows include query 0, which sees every past slot
  // this warp's tiles: slots [first + i * stride, + kSlots) for i < n_tiles
  const int64_t first = t_begin + static_cast<int64_t>(warp) * kSlots, stride = static_cast<int64_t>(warps) * kSlots;
  const int n_tiles = first < t_end ? static_cast<int>(ceil_div_dev(t_end - first, stride)) : 0;
  auto tile_valid = [&](int i) {  // slots of tile i before t_end
    return static_cast<int>(min(static_cast<int64_t>(kSlots), t_end - first - i * stride));
  };

  const bool pipelined = a.ring > 1;
  if (pipelined) {  // the first ring - 1 tiles start streaming (one commit group per tile, empty ones included)
    for (int i = 0; i + 1 < a.ring; ++i) {
      if (i < n_tiles) issue_tile(d, a, b, team, first + i * stride, tile_valid(i), kv_buf(i), mk_buf(i));
      cp_async_commit();
    }
  }

  // the block's 16 query rows (zeros past nrows) as A fragments, once: q[k] covers columns [16k, 16k + 16);
  // the capped build copies the rows to shared memory instead (one barrier) and reads q[k] from there
  const int ksteps = a.ldq / 16, o16 = a.r16 / 16;
  uint32_t q[kQShared ? 1 : kKSteps][4];
  const __half* qrows = a.q + (b * rows + row0) * a.ldq;
  // kQShared: this lane's ldmatrix row of k-step 0 (matrix i = A rows +8 (i % 2), columns +8 (i / 2))
  const __half* q_row = nullptr;
  if constexpr (kQShared) {
    __half* qs = reinterpret_cast<__half*>(smem + L.q);
    const int chunks = a.ldq / 8;  // 16-byte chunks of a row (the prepared rows are 32-byte aligned)
    for (int idx = threadIdx.x; idx < 16 * chunks; idx += blockDim.x) {
      const int m = idx / chunks, c = (idx % chunks) * 8;
      *reinterpret_cast<uint4*>(qs + m * a.ld + c) =
          m < nrows ? *reinterpret_cast<const uint4*>(qrows + m * a.ldq + c) : make_uint4(0, 0, 0, 0);
    }
    q_row = qs + (lane % 8 + ((lane / 8) % 2) * 8) * a.ld + (lane / 16) * 8;
    __syncthreads();
  } else {
#pragma unroll
    for (int k = 0; k < kKSteps; ++k)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = g + (i % 2) * 8, c = k * 16 + 2 * t4 + (i / 2) * 8;
        q[k][i] = k < ksteps && m < nrows ? *reinterpret_cast<const uint32_t*>(qrows + m * a.ldq + c) : 0u;
      }
  }
  // this warp's state for rows g and g + 8: running max, this lane's part of the sum, o [16, 16 * kO16]
  float row_m[2] = {kNegInf, kNegInf}, row_l[2] = {0.f, 0.f};
  float o[2 * kO16][4];
#pragma unroll
  for (int j = 0; j < 2 * kO16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  // the rows' own slots; the capped build's from this warp's first slot, clamped to [-1, n_tiles * stride]
  // (the same order against every one of its tiles' slots, in 32 bits: a split is far below 2^31 slots)
  using Slot = std::conditional_t<kCapped, int, int64_t>;
  Slot self[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t own_slot = d.P + (row0 + g + 8 * h) / d.H;
    if constexpr (kCapped)
      self[h] = static_cast<int>(min(max(own_slot - first, static_cast<int64_t>(-1)), n_tiles * stride));
    else
      self[h] = own_slot;
  }

  for (int i = 0; i < n_tiles; ++i) {
    const int64_t t0 = first + i * stride;
    const int n_valid = tile_valid(i);
    const int slot = i % a.ring;
    const __half* kv = kv_buf(slot);
    const int64_t* mk = mk_buf(slot);
    __syncwarp();  // every lane is done reading the buffer that is refilled now (tile i - 1's)
    if (pipelined) {
      const int ahead = i + a.ring - 1;
      if (ahead < n_tiles) issue_tile(d, a, b, team, first + ahead * stride, tile_valid(ahead), kv_buf(ahead % a.ring),
                                      mk_buf(ahead % a.ring));
      cp_async_commit();
      cp_async_wait_pending(a.ring - 1);  // this lane's copies of tile i have landed
      if (copy_past && t0 < d.P) store_past_rows(d, a, b, team, t0, n_valid, kv);  // its own chunks
    } else {
      load_tile(d, a, b, team, t0, n_valid, copy_past, kv_buf(0), mk_buf(0));
    }
    __syncwarp();  // ... and every lane's: ldmatrix reads chunks other lanes loaded

    // scores s [16, kSlots] = q . kv^T: B = kv^T, stored [n = slot][k = feature], so plain ldmatrix; one x4
    // covers slots [16p, 16p + 16) x features [16k, 16k + 16): matrices (slots +0, k +0), (+0, +8), (+8, +0),
    // (+8, +8) = b[0], b[1] of n8 tile 2p, then of 2p + 1
    float s[kN8][4];
#pragma unroll
    for (int j = 0; j < kN8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const __half* kv_row = kv + (lane % 8 + (lane / 16) * 8) * a.ld + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int k = 0; k < kKSteps; ++k) {
      if (k >= ksteps) break;
      uint32_t qk[4];
      if constexpr (kQShared) {
        ldmatrix_x4(qk, q_row + k * 16);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) qk[i] = q[k][i];
      }
#pragma unroll
      for (int p = 0; p < kN8 / 2; ++p) {
        uint32_t f[4];
        ldmatrix_x4(f, kv_row + p * 16 * a.ld + k * 16);
        const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
        mma_16816(s[2 * p], qk, b0);
        mma_16816(s[2 * p + 1], qk, b1);
      }
    }

    // online softmax over this lane's scores: s[j][e] is row g + 8 (e / 2), slot 8j + 2t + e % 2;
    // allowed = (t <= self and mask) or t == self (op_spec.md). The row max over the 4 lanes of a quad.
    // (32-bit, in tile coordinates: the rows' own slots at n = own[h])
    const Slot from = kCapped ? static_cast<Slot>(i * stride) : static_cast<Slot>(t0);  // self[] is relative to it
    const int own[2] = {tile_offset(self[0] - from, kSlots), tile_offset(self[1] - from, kSlots)};
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int j = 0; j < kN8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 8 * j + 2 * t4 + e % 2, self_n = own[e / 2];
        const bool ok = n < n_valid && (n == self_n || (n < self_n && mk[n] != 0));
        s[j][e] = ok ? s[j][e] : kNegInf;
        mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
      }
    float f[2];  // rescale of the old state: exp(old max - new max)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float now = fmaxf(row_m[h], mx[h]);
      f[h] = now == kNegInf ? 1.f : expf(row_m[h] - now);  // old = -inf: 0 (o is 0 then anyway)
      row_m[h] = now;
      row_l[h] *= f[h];
    }
#pragma unroll
    for (int j = 0; j < kN8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float now = row_m[e / 2];
        s[j][e] = now == kNegInf ? 0.f : expf(s[j][e] - now);  // exp(-inf) = 0 for masked slots
        row_l[e / 2] += s[j][e];
      }
#pragma unroll
    for (int j = 0; j < 2 * kO16; ++j) {
      o[j][0] *= f[0], o[j][1] *= f[0];
      o[j][2] *= f[1], o[j][3] *= f[1];
    }

    // o += p . v, v = the tile's latent columns [slots, r16]: the C fragments of n8 tiles 2kk, 2kk + 1
    // are the A fragment of k-step kk (FlashAttention-2's register reuse); B = v stored [k = slot][n =
    // column], so ldmatrix.trans; one x4 covers slots [16kk, +16) x columns [16c, +16): matrices (slots +0,
    // columns +0), (+8, +0), (+0, +8), (+8, +8) = b[0], b[1] of n8 tile 2c, then of 2c + 1
    const __half* v_row = kv + (lane % 8 + ((lane / 8) % 2) * 8) * a.ld + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kN8 / 2; ++kk) {
      const uint32_t p[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                             pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int c = 0; c < kO16; ++c) {
        if (c >= o16) break;
        uint32_t fv[4];
        ldmatrix_x4_trans(fv, v_row + kk * 16 * a.ld + c * 16);
        const uint32_t b0[2] = {fv[0], fv[1]}, b1[2] = {fv[2], fv[3]};
        mma_16816(o[2 * c], p, b0);
        mma_16816(o[2 * c + 1], p, b1);
      }
    }
  }

  // combine the warps: the sums over the quads, then every warp's state -> shared memory (over the rings,
  // once every warp is done with its own), weights exp(m_w - M), o = sum_w weight_w o_w
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_l[h] += __shfl_xor_sync(0xffffffffu, row_l[h], 1);
    row_l[h] += __shfl_xor_sync(0xffffffffu, row_l[h], 2);
  }
  float* wo = reinterpret_cast<float*>(smem + L.o);  // [warps, 16, ldo]
  float* wm = reinterpret_cast<float*>(smem + L.m);  // [warps, 16]
  float* wl = reinterpret_cast<float*>(smem + L.l);  // [warps, 16]
  float* row_max = reinterpret_cast<float*>(smem + L.row_max);
  float* row_sum = reinterpret_cast<float*>(smem + L.row_sum);
  __syncthreads();
  float* mine = wo + warp * 16 * a.ldo;
#pragma unroll
  for (int j = 0; j < 2 * kO16; ++j) {
    if (j >= 2 * o16) break;
    const int c = 8 * j + 2 * t4;
    mine[g * a.ldo + c] = o[j][0], mine[g * a.ldo + c + 1] = o[j][1];
    mine[(g + 8) * a.ldo + c] = o[j][2], mine[(g + 8) * a.ldo + c + 1] = o[j][3];
  }
  if (t4 == 0) {
    wm[warp * 16 + g] = row_m[0], wm[warp * 16 + g + 8] = row_m[1];
    wl[warp * 16 + g] = row_l[0], wl[warp * 16 + g + 8] = row_l[1];
  }
  __syncthreads();
  for (int m = threadIdx.x; m < 16; m += blockDim.x) {
    float top = kNegInf;
    for (int w = 0; w < warps; ++w) top = fmaxf(top, wm[w * 16 + m]);
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) {
      const float weight = top == kNegInf ? 0.f : expf(wm[w * 16 + m] - top);  // a warp without slots: 0
      wm[w * 16 + m] = weight;
      sum += weight * wl[w * 16 + m];
    }
    row_max[m] = top;
    row_sum[m] = sum;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * a.r16; idx += blockDim.x) {  // into warp 0's o
    const int m = idx / a.r16, c = idx % a.r16;
    float acc = 0.f;
    for (int w = 0; w < warps; ++w) acc = fmaf(wm[w * 16 + m], wo[(w * 16 + m) * a.ldo + c], acc);
    wo[m * a.ldo + c] = acc;
  }
  __syncthreads();
  attend_epilogue(d, a, b, split, row0, nrows, wo, row_max, row_sum);
}

// The warps kernel instantiated for these dims and warp tile, or nullptr (the plan never asks for one).
using WarpsKernel = void (*)(Dims, AttendArgs<__half>);

template <int kSlots, bool kCapped>
WarpsKernel warps_kernel_for_slots(int ldq, int r16) {
  if (ldq <= 64) return attend_warps_kernel<kSlots, 4, 4, kCapped>;
  if (ldq <= 128 && r16 <= 96) return attend_warps_kernel<kSlots, 8, 6, kCapped>;  // SmolLM2-MLA: ldq 128, r16 96
  if constexpr (!kCapped) {  // no capped build past r16 = 96: its 64 o registers alone would spill under 128
    if (ldq <= 128) return attend_warps_kernel<kSlots, 8, 8, false>;
  }
  return nullptr;
}

template <bool kCapped>
WarpsKernel warps_kernel_for(const Plan& plan) {
  if (plan.block_n == 16) return warps_kernel_for_slots<16, kCapped>(plan.ldq, plan.r16);
  if (plan.block_n == 32) return warps_kernel_for_slots<32, kCapped>(plan.ldq, plan.r16);
  if (plan.block_n == 64) return warps_kernel_for_slots<64, kCapped>(plan.ldq, plan.r16);
  return nullptr;
}

WarpsKernel warps_kernel(const Plan& plan) {
  return plan.max_registers == kCappedRegisters ? warps_kernel_for<true>(plan) : warps_kernel_for<false>(plan);
}

// ---------------------------------------------------------------------------------------------
// self-check of the tensor-core primitives (check_tensor_core_fragments)
// ---------------------------------------------------------------------------------------------

// One warp. in: m16 [16, 16] halves; a [16, 16], b [16, 8] (k-major), c [16, 8] f32. out (u32):
// [0, 128) the 4 registers of each lane after ldmatrix_x4 of m16 (the scores' addressing), [128, 256)
// after ldmatrix_x4_trans (the weighted sum's), [256, 384) d = a . b + c as floats, the fragments
// gathered by the documented layout from global memory.
__global__ void fragments_kernel(const __half* m16, const __half* a, const __half* b, const float* c, uint32_t* out) {
  MLA_DYNAMIC_SMEM(__half, tile);  // m16 with a padded row stride, as the cache tiles
  constexpr int ld = 24;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * 16; i += kWarp) tile[(i / 16) * ld + i % 16] = m16[i];
  __syncwarp();
  uint32_t r[4];
  ldmatrix_x4(r, tile + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
  ldmatrix_x4_trans(r, tile + (lane % 8 + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8);
  for (int i = 0; i < 4; ++i) out[128 + lane * 4 + i] = r[i];
  auto pair = [](const __half* p, int stride) {  // p[0], p[stride] as one .f16x2
    return pack_half2(__half2float(p[0]), __half2float(p[stride]));
  };
  const uint32_t fa[4] = {pair(a + g * 16 + 2 * t, 1), pair(a + (g + 8) * 16 + 2 * t, 1),
                          pair(a + g * 16 + 2 * t + 8, 1), pair(a + (g + 8) * 16 + 2 * t + 8, 1)};
  const uint32_t fb[2] = {pair(b + (2 * t) * 8 + g, 8), pair(b + (2 * t + 8) * 8 + g, 8)};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  mma_16816(acc, fa, fb);
  for (int i = 0; i < 4; ++i) reinterpret_cast<float*>(out + 256)[lane * 4 + i] = acc[i];
}

