// gpart CPU kernels: the GPart partition ids fused with gather / scatter-add.
// Plain C++17 + OpenMP, no torch headers; loaded with ctypes. See gpart/kernels/cpu.py.
//
// Bit-exactness with gpart.partition (the reference):
// - the round function is uint32 wrap-around arithmetic: the reference masks with 0xFFFFFFFF after
//   every add and multiply by a constant below 2^31, which is exactly uint32 arithmetic;
// - the Feistel halves are at most 32 bits each; when D <= 2^32 the whole value fits a uint32
//   ("narrow" path, SIMD friendly), otherwise the value is a uint64 ("wide" path);
// - v mod d is exact: a mask when d is a power of two; else a single-precision quotient estimate with a
//   correction each way where its error provably stays below one (mod32f), or a double-precision one
//   (never above the true quotient for v < 2^52, at most one below) with one integer correction;
//   128-bit fastmod on the wide path;
// - floating point: one multiply (dropout) and one add (base weight), never contracted into an FMA
//   (built with -ffp-contract=off), so values equal the reference's element-wise torch ops.
//
// Speed (docs/performance.md): the ids cost most. The Feistel rounds run as uint32 SIMD lanes (the
// loops are written for the auto-vectoriser); for a contiguous slice the first round reads a per-call
// table (its input is the low half of the position, so consecutive positions read consecutive
// entries); cycle-walking runs on a compacted list of the lanes still outside [0, D); `mod d` is a
// mask when d is a power of two, else a float or double quotient estimate with exact corrections. The
// backward's merge and scatter share one computation of the ids (gpart_merge_scatter).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint32_t u32;
typedef uint64_t u64;
typedef uint16_t u16;

#define GPART_ABI 4
#define TILE 4096

extern "C" {
struct GPartParams {
    u64 D;          // number of positions
    u64 d;          // number of groups (d <= 2^32 here; the caller falls back otherwise)
    u32 keys[4];    // Feistel round keys
    u32 a, b;       // widths of the halves
    u32 drop;       // 1: apply DropConnect
    u32 drop_klo;   // key & 0xFFFFFFFF
    u32 drop_khi;   // (key >> 32) & 0xFFFFFFFF
    u32 version;    // partition version: 1 (binary Feistel, halves a and b) or 2 (grid 2^grid_p x grid_B)
    u64 drop_thr;   // int(p * 2^32)
    float drop_scale;  // float32(1) / float32(1 - p), as torch computes it (kept positions)
    float drop_zero;   // float32(0) / float32(1 - p) (dropped positions: 0, NaN when p == 1)
    int32_t nthreads;
    int32_t pad2;
    u32 grid_p;     // version 2: the column width p (the grid has 2^p columns)
    u32 grid_B;     // version 2: the number of rows B = ceil(D / 2^p)
};
}

static inline u32 rf(u32 x, u32 k) {
    x += k;
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

struct Ctx {
    u64 D, d;
    u32 k0, k1, k2, k3, a, b, ma, mb;
    u32 narrow;      // D <= 2^32
    u32 walk;        // D < the permutation's domain: cycle-walking may be needed
    u32 grid;        // partition version 2
    u32 gp, gmask, gB;  // version 2: column bits, column mask 2^p - 1, rows
    u32 modkind;     // 0: id = v (d == D), 1: id = 0 (d == 1), 2: general, 3: d a power of two,
                     // 4: single-precision quotient (d <= 2^30 and D / d < 2^21)
    u32 Dm1_32, d32;
    double inv_d;
    float inv_f;
    unsigned __int128 M128;  // fastmod constant, wide path
    bool drop;
    u32 klo, khi;
    u64 thr;
    float scale, zero;
    int nt;
    const u32* t0;   // NULL, or the first round's F(r) & ma for r = j & mb, j < 2^b + TILE (contiguous positions)
};

static Ctx make_ctx(const GPartParams* p) {
    Ctx c;
    c.D = p->D; c.d = p->d;
    c.k0 = p->keys[0]; c.k1 = p->keys[1]; c.k2 = p->keys[2]; c.k3 = p->keys[3];
    c.a = p->a; c.b = p->b;
    c.ma = p->a >= 32 ? 0xFFFFFFFFu : ((1u << p->a) - 1u);
    c.mb = p->b >= 32 ? 0xFFFFFFFFu : ((1u << p->b) - 1u);
    c.narrow = p->D <= (u64(1) << 32);
    u32 total = p->a + p->b;
    c.grid = p->version == 2;
    c.gp = p->grid_p; c.gB = p->grid_B;
    c.gmask = p->grid_p >= 32 ? 0xFFFFFFFFu : ((1u << p->grid_p) - 1u);
    if (c.grid) c.walk = p->D != ((u64(1) << p->grid_p) * (u64)p->grid_B);
    else c.walk = total >= 64 ? 1 : (p->D != (u64(1) << total));
    c.modkind = (p->d == p->D) ? 0 : (p->d == 1 ? 1 : ((p->d & (p->d - 1)) == 0 ? 3 : 2));
    c.Dm1_32 = (u32)(p->D - 1);
    c.d32 = (u32)p->d;
    c.inv_d = 1.0 / (double)p->d;
    c.inv_f = 1.0f / (float)p->d;
    if (c.modkind == 2 && p->d <= (u64(1) << 30) && (p->D - 1) / p->d < (u64(1) << 21)) c.modkind = 4;
    c.M128 = (p->d > 1) ? (~(unsigned __int128)0) / p->d + 1 : 0;
    c.drop = p->drop != 0;
    c.klo = p->drop_klo; c.khi = p->drop_khi; c.thr = p->drop_thr; c.scale = p->drop_scale; c.zero = p->drop_zero;
    c.nt = p->nthreads < 1 ? 1 : p->nthreads;
    c.t0 = nullptr;
    return c;
}

// ---- the permutation ---------------------------------------------------------------------------

static inline u32 feistel32(u32 x, u32 k0, u32 k1, u32 k2, u32 k3, u32 b, u32 ma, u32 mb) {
    u32 L = x >> b, R = x & mb, t;
    t = L ^ (rf(R, k0) & ma); L = R; R = t;
    t = L ^ (rf(R, k1) & mb); L = R; R = t;
    t = L ^ (rf(R, k2) & ma); L = R; R = t;
    t = L ^ (rf(R, k3) & mb); L = R; R = t;
    return (L << b) | R;
}

// Rounds 2-4 of feistel32, from the state after round 1.
static inline u32 feistel32_from1(u32 L, u32 R, u32 k1, u32 k2, u32 k3, u32 b, u32 ma, u32 mb) {
    u32 t;
    t = L ^ (rf(R, k1) & mb); L = R; R = t;
    t = L ^ (rf(R, k2) & ma); L = R; R = t;
    t = L ^ (rf(R, k3) & mb); L = R; R = t;
    return (L << b) | R;
}

static inline u64 feistel64(u64 x, const Ctx& c) {
    u32 L = (u32)(x >> c.b), R = (u32)x & c.mb, t;
    t = L ^ (rf(R, c.k0) & c.ma); L = R; R = t;
    t = L ^ (rf(R, c.k1) & c.mb); L = R; R = t;
    t = L ^ (rf(R, c.k2) & c.ma); L = R; R = t;
    t = L ^ (rf(R, c.k3) & c.mb); L = R; R = t;
    return ((u64)L << c.b) | R;
}

// Version 2: the grid of 2^p columns x B rows (gpart.partition.feistel_grid). A round adds a hash of the
// row to the column (mod 2^p), or spread(hash of the column) to the row (mod B).
static inline u32 addmod(u32 y, u32 r, u32 B) {  // (y + r) mod B for y, r < B <= 2^31
    const u32 t = y + r;
    return t >= B ? t - B : t;
}
// spread(h, B) = ((h >> 16) * B) >> 16; narrow (D <= 2^32) means B <= 2^16, so the product fits 32 bits
static inline u32 spread32(u32 h, u32 B) { return ((h >> 16) * B) >> 16; }
static inline u32 spread64(u32 h, u32 B) { return (u32)(((u64)(h >> 16) * B) >> 16); }

// Rounds 2-4 of the narrow grid permutation, from the column after round 1 and the row.
static inline u32 grid32_from1(u32 col, u32 row, u32 k1, u32 k2, u32 k3, u32 p, u32 mask, u32 B) {
    row = addmod(row, spread32(rf(col, k1), B), B);
    col = (col + rf(row, k2)) & mask;
    row = addmod(row, spread32(rf(col, k3), B), B);
    return (row << p) | col;
}

static inline u32 grid32(u32 v, const Ctx& c) {
    const u32 row = v >> c.gp;
    // (v + F) & mask is (column + F) mod 2^p: the row bits above p do not reach the low p bits
    return grid32_from1((v + rf(row, c.k0)) & c.gmask, row, c.k1, c.k2, c.k3, c.gp, c.gmask, c.gB);
}

// The wide grid (D > 2^32): the column has p <= 32 bits, the row is below B <= 2^31; rounds 2-4.
static inline u64 grid64_from1(u32 col, u32 row, u32 k1, u32 k2, u32 k3, u32 p, u32 mask, u32 B) {
    row = addmod(row, spread64(rf(col, k1), B), B);
    col = (col + rf(row, k2)) & mask;
    row = addmod(row, spread64(rf(col, k3), B), B);
    return ((u64)row << p) | col;
}

static inline u64 grid64(u64 v, const Ctx& c) {
    const u32 row = (u32)(v >> c.gp);
    return grid64_from1(((u32)v + rf(row, c.k0)) & c.gmask, row, c.k1, c.k2, c.k3, c.gp, c.gmask, c.gB);
}

// Exact v mod d for v < 2^32, d < 2^32: q = trunc(v * (1/d)) in double is the true quotient or one
// less (the relative error 2^-52 cannot reach the next integer below 2^52), so one correction.
static inline u32 mod32(u32 v, u32 d, double inv) {
    u32 q = (u32)((double)v * inv);
    u32 r = v - q * d;
    return r >= d ? r - d : r;
}

// v mod d from a single-precision quotient estimate (twice as fast as mod32), exact when v / d < 2^21 and
// d <= 2^30: four roundings of relative size 2^-24 put the estimate within 0.5 of v / d, so q is the true
// quotient or one off either way, and r = v - q d lies in (-d, 2d): one correction each way.
static inline u32 mod32f(u32 v, u32 d, float inv) {
    const u32 q = (u32)((float)v * inv);
    u32 r = v - q * d;
    r = (int32_t)r < 0 ? r + d : r;
    return r >= d ? r - d : r;
}

// Lemire, Kaser, Kurz, "Faster remainder by direct computation" (2019): exact for 64-bit v and d.
static inline u64 mod64(u64 v, u64 d, unsigned __int128 M) {
    unsigned __int128 low = M * v;
    unsigned __int128 bottom = ((unsigned __int128)(u64)low * d) >> 64;
    unsigned __int128 top = (unsigned __int128)(u64)(low >> 64) * d;
    return (u64)((bottom + top) >> 64);
}


#if defined(__AVX512F__)
#include <immintrin.h>
#define GPART_AVX512_WALK 1
// Cycle-walking of the values above D-1: compact them into a list (AVX-512 compress in registers; no
// compress-to-memory, which is microcoded on some cores), re-permute the whole list with the
// auto-vectorised loop, write back the values now inside [0, D) and compact the rest; repeat.
static void walk_narrow(const Ctx& c, u32* ids, int n) {
    alignas(64) u32 bidx[TILE + 16];
    alignas(64) u32 bval[TILE + 16];
    const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, b = c.b, ma = c.ma, mb = c.mb;
    const __m512i Dm1 = _mm512_set1_epi32((int)c.Dm1_32);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int nb = 0;
    for (int i = 0; i < n; i += 16) {
        const __mmask16 live = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        const __m512i v = _mm512_maskz_loadu_epi32(live, ids + i);
        const __mmask16 m = _mm512_mask_cmpgt_epu32_mask(live, v, Dm1);
        _mm512_storeu_si512(bidx + nb, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32(i))));
        _mm512_storeu_si512(bval + nb, _mm512_maskz_compress_epi32(m, v));
        nb += __builtin_popcount((unsigned)m);
    }
    while (nb) {
        for (int j = 0; j < nb; j++) bval[j] = feistel32(bval[j], k0, k1, k2, k3, b, ma, mb);
        int nb2 = 0;
        for (int j = 0; j < nb; j += 16) {
            const __mmask16 live = (nb - j >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1u);
            const __m512i idx = _mm512_maskz_loadu_epi32(live, bidx + j);
            const __m512i w = _mm512_maskz_loadu_epi32(live, bval + j);
            const __mmask16 bad = _mm512_mask_cmpgt_epu32_mask(live, w, Dm1);
            _mm512_mask_i32scatter_epi32(ids, live & (__mmask16)~bad, idx, w, 4);
            // in place: the write position nb2 never passes the read position j
            _mm512_storeu_si512(bidx + nb2, _mm512_maskz_compress_epi32(bad, idx));
            _mm512_storeu_si512(bval + nb2, _mm512_maskz_compress_epi32(bad, w));
            nb2 += __builtin_popcount((unsigned)bad);
        }
        nb = nb2;
    }
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define GPART_AVX2_WALK 1
// The same on AVX2, which has no compress: a 256-entry table of lane permutations does it.
struct CompressLUT {
    alignas(32) u32 perm[256][8];
    CompressLUT() {
        for (int m = 0; m < 256; m++) {
            int k = 0;
            for (int l = 0; l < 8; l++) if (m & (1 << l)) perm[m][k++] = (u32)l;
            for (; k < 8; k++) perm[m][k] = 0;
        }
    }
};
static const CompressLUT lut;

static inline int gt_mask8(__m256i v, __m256i lim_flipped) {
    const __m256i flip = _mm256_set1_epi32((int)0x80000000u);  // unsigned compare via signed
    return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_xor_si256(v, flip), lim_flipped)));
}

static void walk_narrow(const Ctx& c, u32* ids, int n) {
    alignas(32) u32 bidx[TILE + 8];
    alignas(32) u32 bval[TILE + 8];
    const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, b = c.b, ma = c.ma, mb = c.mb, Dm1 = c.Dm1_32;
    const __m256i lim = _mm256_set1_epi32((int)(Dm1 ^ 0x80000000u));
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int nb = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(ids + i));
        const int m = gt_mask8(v, lim);
        const __m256i perm = _mm256_load_si256((const __m256i*)lut.perm[m]);
        _mm256_storeu_si256((__m256i*)(bidx + nb), _mm256_permutevar8x32_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(i)), perm));
        _mm256_storeu_si256((__m256i*)(bval + nb), _mm256_permutevar8x32_epi32(v, perm));
        nb += __builtin_popcount((unsigned)m);
    }
    for (; i < n; i++) { bidx[nb] = (u32)i; bval[nb] = ids[i]; nb += ids[i] > Dm1; }
    while (nb) {
        for (int j = 0; j < nb; j++) bval[j] = feistel32(bval[j], k0, k1, k2, k3, b, ma, mb);
        // write every value back (those still outside [0, D) are overwritten when they come in)
        for (int j = 0; j < nb; j++) ids[bidx[j]] = bval[j];
        int nb2 = 0;
        for (int j = 0; j < nb; j += 8) {
            const int live = nb - j >= 8 ? 0xFF : (1 << (nb - j)) - 1;
            const __m256i idx = _mm256_loadu_si256((const __m256i*)(bidx + j));
            const __m256i w = _mm256_loadu_si256((const __m256i*)(bval + j));
            const int m = gt_mask8(w, lim) & live;
            const __m256i perm = _mm256_load_si256((const __m256i*)lut.perm[m]);
            _mm256_storeu_si256((__m256i*)(bidx + nb2), _mm256_permutevar8x32_epi32(idx, perm));
            _mm256_storeu_si256((__m256i*)(bval + nb2), _mm256_permutevar8x32_epi32(w, perm));
            nb2 += __builtin_popcount((unsigned)m);
        }
        nb = nb2;
    }
}
#else
static void walk_narrow(const Ctx& c, u32* ids, int n) {
    u32 bidx[TILE];
    u32 bval[TILE];
    const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, b = c.b, ma = c.ma, mb = c.mb, Dm1 = c.Dm1_32;
    int nb = 0;
    for (int i = 0; i < n; i++) {
        const u32 v = ids[i];
        bidx[nb] = (u32)i;
        bval[nb] = v;
        nb += v > Dm1;
    }
    while (nb) {
        for (int j = 0; j < nb; j++) bval[j] = feistel32(bval[j], k0, k1, k2, k3, b, ma, mb);
        int nb2 = 0;
        for (int j = 0; j < nb; j++) {
            const u32 w = bval[j], idx = bidx[j];
            ids[idx] = w;
            bidx[nb2] = idx;
            bval[nb2] = w;
            nb2 += w > Dm1;
        }
        nb = nb2;
    }
}
#endif

// ids[i] = v_i mod d in place, for permuted values v_i < 2^32.
static void reduce_narrow(const Ctx& c, u32* ids, int n) {
    if (c.modkind == 1) {
        for (int i = 0; i < n; i++) ids[i] = 0;
    } else if (c.modkind == 2) {
        const u32 d = c.d32;
        const double inv = c.inv_d;
        for (int i = 0; i < n; i++) ids[i] = mod32(ids[i], d, inv);
    } else if (c.modkind == 3) {
        const u32 m = c.d32 - 1u;
        for (int i = 0; i < n; i++) ids[i] &= m;
    } else if (c.modkind == 4) {
        const u32 d = c.d32;
        const float inv = c.inv_f;
        for (int i = 0; i < n; i++) ids[i] = mod32f(ids[i], d, inv);
    }
}

// ids[i] = v[i] mod d, for permuted 64-bit values (D > 2^32, so d < D; d <= 2^32 is the caller's check).
static void reduce_wide(const Ctx& c, const u64* v, int n, u32* ids) {
    if (c.modkind == 1) {
        for (int i = 0; i < n; i++) ids[i] = 0;
    } else if (c.modkind == 3) {
        const u64 m = c.d - 1;
        for (int i = 0; i < n; i++) ids[i] = (u32)(v[i] & m);
    } else {
        const u64 d = c.d;
        const unsigned __int128 M = c.M128;
        for (int i = 0; i < n; i++) ids[i] = (u32)mod64(v[i], d, M);
    }
}

// Version 2's group ids. Its grid exceeds D by less than one row, so walked values are rare (fewer than
// 1 in B): one vectorised test per tile, then a scalar loop over the few values that need it.
template <bool CONTIG>
static void grid_ids_tile(const Ctx& c, u64 start, const int64_t* pos, int n, u32* ids) {
    if (c.narrow) {
        const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, p = c.gp, mask = c.gmask, B = c.gB;
        if (CONTIG) {
            // the first round adds F(row), one value per run of positions in the same row
            const u32 s32 = (u32)start;
            for (int i = 0; i < n;) {
                const u32 x0 = s32 + (u32)i, row = x0 >> p, f0 = rf(row, k0);
                int run = (int)(mask - (x0 & mask)) + 1;
                if (run > n - i) run = n - i;
                for (int j = 0; j < run; j++)
                    ids[i + j] = grid32_from1((x0 + (u32)j + f0) & mask, row, k1, k2, k3, p, mask, B);
                i += run;
            }
        } else {
            for (int i = 0; i < n; i++) ids[i] = grid32((u32)pos[i], c);
        }
        if (c.walk) {
            const u32 Dm1 = c.Dm1_32;
            u32 out = 0;
            for (int i = 0; i < n; i++) out |= ids[i] > Dm1;
            if (out)
                for (int i = 0; i < n; i++)
                    while (ids[i] > Dm1) ids[i] = grid32(ids[i], c);
        }
        reduce_narrow(c, ids, n);
    } else {
        u64 v[TILE];
        const u64 D = c.D;
        const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, p = c.gp, mask = c.gmask, B = c.gB;
        if (CONTIG) {
            for (int i = 0; i < n;) {
                const u64 x0 = start + (u64)i;
                const u32 row = (u32)(x0 >> p), f0 = rf(row, k0), col0 = (u32)x0 & mask;
                const u64 left = (u64)mask - col0 + 1;
                const int run = left < (u64)(n - i) ? (int)left : n - i;
                for (int j = 0; j < run; j++) v[i + j] = grid64_from1((col0 + (u32)j + f0) & mask, row, k1, k2, k3, p, mask, B);
                i += run;
            }
        } else {
            for (int i = 0; i < n; i++) v[i] = grid64((u64)pos[i], c);
        }
        if (c.walk) {
            u64 out = 0;
            for (int i = 0; i < n; i++) out |= v[i] >= D;
            if (out)
                for (int i = 0; i < n; i++)
                    while (v[i] >= D) v[i] = grid64(v[i], c);
        }
        reduce_wide(c, v, n, ids);
    }
}

// Group ids of n positions (contiguous from `start`, or pos[0..n)) into ids[0..n) (uint32).
template <bool CONTIG>
static void ids_tile(const Ctx& c, u64 start, const int64_t* pos, int n, u32* ids) {
    if (c.grid) {
        grid_ids_tile<CONTIG>(c, start, pos, n, ids);
        return;
    }
    if (c.narrow) {
        const u32 k0 = c.k0, k1 = c.k1, k2 = c.k2, k3 = c.k3, b = c.b, ma = c.ma, mb = c.mb;
        const u32 s32 = (u32)start;
        if (CONTIG && c.t0) {
            // the first round's input is the low half of the position: consecutive positions read
            // consecutive entries of the table (a plain vector load instead of a round)
            const u32* tp = c.t0 + (s32 & mb);
            for (int i = 0; i < n; i++) {
                const u32 x = s32 + (u32)i;
                ids[i] = feistel32_from1(x & mb, (x >> b) ^ tp[i], k1, k2, k3, b, ma, mb);
            }
        } else {
            for (int i = 0; i < n; i++) {
                u32 x = CONTIG ? s32 + (u32)i : (u32)pos[i];
                ids[i] = feistel32(x, k0, k1, k2, k3, b, ma, mb);
            }
        }
        if (c.walk) walk_narrow(c, ids, n);
        reduce_narrow(c, ids, n);
    } else {
        // wide: D > 2^32, hence d < D; d <= 2^32 is checked by the caller. Same three passes as the
        // narrow path (permute, cycle-walk the compacted list, reduce), in uint64.
        u64 v[TILE];
        u32 bidx[TILE];
        u64 bval[TILE];
        for (int i = 0; i < n; i++) v[i] = feistel64(CONTIG ? start + (u64)i : (u64)pos[i], c);
        const u64 D = c.D;
        int nb = 0;
        for (int i = 0; i < n; i++) {
            bidx[nb] = (u32)i;
            bval[nb] = v[i];
            nb += v[i] >= D;
        }
        while (nb) {
            for (int j = 0; j < nb; j++) bval[j] = feistel64(bval[j], c);
            int nb2 = 0;
            for (int j = 0; j < nb; j++) {
                const u64 w = bval[j];
                const u32 idx = bidx[j];
                v[idx] = w;
                bidx[nb2] = idx;
                bval[nb2] = w;
                nb2 += w >= D;
            }
            nb = nb2;
        }
        reduce_wide(c, v, n, ids);
    }
}

// DropConnect keep/scale factor of each position (the reference: DropConnect.keep_scale).
template <bool CONTIG>
static void keep_tile(const Ctx& c, u64 start, const int64_t* pos, int n, float* ks) {
    const u32 klo = c.klo, khi = c.khi;
    const u64 thr = c.thr;
    const float scale = c.scale, zero = c.zero;
    for (int i = 0; i < n; i++) {
        u64 p = CONTIG ? start + (u64)i : (u64)pos[i];
        u32 bits = rf(rf((u32)p, klo) ^ (u32)(p >> 32), khi);
        ks[i] = ((u64)bits >= thr) ? scale : zero;
    }
}

// ---- dtypes ------------------------------------------------------------------------------------
// 0: float32, 1: bfloat16, 2: float16 (conversions as c10 does them: round to nearest even).

static inline float f32_from_bits(u32 w) { float f; std::memcpy(&f, &w, 4); return f; }
static inline u32 bits_from_f32(float f) { u32 w; std::memcpy(&w, &f, 4); return w; }

static inline float bf16_to_f32(u16 h) { return f32_from_bits((u32)h << 16); }
static inline u16 f32_to_bf16(float f) {
    u32 u = bits_from_f32(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
    return (u16)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// IEEE half <-> single (the FP16 library's exact algorithms, as used by c10::Half).
static inline float f16_to_f32(u16 h) {
    const u32 w = (u32)h << 16;
    const u32 sign = w & 0x80000000u;
    const u32 two_w = w + w;
    const u32 exp_offset = 0xE0u << 23;
    const float exp_scale = f32_from_bits(0x7800000u);  // 0x1.0p-112f
    const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const u32 magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const u32 denormalized_cutoff = 1u << 27;
    const u32 result = sign | (two_w < denormalized_cutoff ? bits_from_f32(denormalized) : bits_from_f32(normalized));
    return f32_from_bits(result);
}
static inline u16 f32_to_f16(float f) {
    const float scale_to_inf = f32_from_bits(0x77800000u);   // 0x1.0p+112f
    const float scale_to_zero = f32_from_bits(0x08800000u);  // 0x1.0p-110f
    float af = f32_from_bits(bits_from_f32(f) & 0x7FFFFFFFu);
    float base = (af * scale_to_inf) * scale_to_zero;
    const u32 w = bits_from_f32(f);
    const u32 shl1_w = w + w;
    const u32 sign = w & 0x80000000u;
    u32 bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const u32 bits = bits_from_f32(base);
    const u32 exp_bits = (bits >> 13) & 0x00007C00u;
    const u32 mantissa_bits = bits & 0x00000FFFu;
    const u32 nonsign = exp_bits + mantissa_bits;
    return (u16)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

struct F32 { typedef float T; static inline float load(const T* p, int64_t i) { return p[i]; } static inline void store(T* p, int64_t i, float v) { p[i] = v; } };
struct BF16 { typedef u16 T; static inline float load(const T* p, int64_t i) { return bf16_to_f32(p[i]); } static inline void store(T* p, int64_t i, float v) { p[i] = f32_to_bf16(v); } };
struct F16 { typedef u16 T; static inline float load(const T* p, int64_t i) { return f16_to_f32(p[i]); } static inline void store(T* p, int64_t i, float v) { p[i] = f32_to_f16(v); } };
struct NONE { typedef float T; static inline float load(const T*, int64_t) { return 0.0f; } };

// ---- gather: out[i] = base[i] + theta[g(i)] * keep(i) ------------------------------------------

template <class B, class O, bool DROP, bool HASBASE>
static inline void gather_consume(const u32* ids, const float* ks, const float* theta, const void* base, void* out,
                                  int64_t off, int n) {
    const typename B::T* bp = (const typename B::T*)base + off;
    typename O::T* op = (typename O::T*)out + off;
    // no loop-carried dependency (out may be base itself, element by element; theta is never written):
    // lets the compiler vectorize the gather, which it would not do on its own for fear of aliasing
#pragma GCC ivdep
    for (int i = 0; i < n; i++) {
        float v = theta[ids[i]];
        if (DROP) v = v * ks[i];
        if (HASBASE) v = B::load(bp, i) + v;
        O::store(op, i, v);
    }
}

typedef void (*gather_fn)(const u32*, const float*, const float*, const void*, void*, int64_t, int);

template <class O>
static gather_fn pick_gather_o(int bdt, bool drop) {
    switch (bdt) {
        case -1: return drop ? gather_consume<NONE, O, true, false> : gather_consume<NONE, O, false, false>;
        case 0: return drop ? gather_consume<F32, O, true, true> : gather_consume<F32, O, false, true>;
        case 1: return drop ? gather_consume<BF16, O, true, true> : gather_consume<BF16, O, false, true>;
        case 2: return drop ? gather_consume<F16, O, true, true> : gather_consume<F16, O, false, true>;
    }
    return nullptr;
}

static gather_fn pick_gather(int bdt, int odt, bool drop) {
    switch (odt) {
        case 0: return pick_gather_o<F32>(bdt, drop);
        case 1: return pick_gather_o<BF16>(bdt, drop);
        case 2: return pick_gather_o<F16>(bdt, drop);
    }
    return nullptr;
}

static bool positions_ok(const int64_t* pos, int64_t n, u64 D) {
    u64 bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (u64)((u64)pos[i] >= D);
    return bad == 0;
}

static inline int threads_for(const Ctx& c, int64_t n) {
    // below ~32k elements a parallel region costs more than it saves
    int64_t t = n / 32768;
    if (t < 1) t = 1;
    return (int)(t < c.nt ? t : c.nt);
}

template <bool CONTIG>
static void gather_impl(const Ctx& c, u64 start, const int64_t* pos, int64_t n, const float* theta,
                        const void* base, void* out, gather_fn fn) {
    const int64_t ntiles = (n + TILE - 1) / TILE;
    const int nt = threads_for(c, n);
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
    for (int64_t t = 0; t < ntiles; t++) {
        u32 ids[TILE];
        float ks[TILE];
        const int64_t off = t * TILE;
        const int m = (int)((n - off) < TILE ? (n - off) : TILE);
        ids_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ids);
        if (c.drop) keep_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ks);
        fn(ids, ks, theta, base, out, off, m);
    }
}

// ---- scatter: acc[g(i)] += grad[i] * keep(i), in fp32 ------------------------------------------

template <class G, bool DROP>
static inline void scatter_consume(const u32* ids, const float* ks, const void* grad, float* acc, int64_t off, int n) {
    const typename G::T* gp = (const typename G::T*)grad + off;
    for (int i = 0; i < n; i++) {
        float v = G::load(gp, i);
        if (DROP) v = v * ks[i];
        acc[ids[i]] += v;
    }
}

// values only (for the owner-partitioned mode): vals[i] = grad[i] * keep(i)
template <class G, bool DROP>
static inline void values_consume(const float* ks, const void* grad, float* vals, int64_t off, int n) {
    const typename G::T* gp = (const typename G::T*)grad + off;
    for (int i = 0; i < n; i++) {
        float v = G::load(gp, i);
        if (DROP) v = v * ks[i];
        vals[i] = v;
    }
}

typedef void (*scatter_fn)(const u32*, const float*, const void*, float*, int64_t, int);
typedef void (*values_fn)(const float*, const void*, float*, int64_t, int);

static scatter_fn pick_scatter(int gdt, bool drop) {
    switch (gdt) {
        case 0: return drop ? scatter_consume<F32, true> : scatter_consume<F32, false>;
        case 1: return drop ? scatter_consume<BF16, true> : scatter_consume<BF16, false>;
        case 2: return drop ? scatter_consume<F16, true> : scatter_consume<F16, false>;
    }
    return nullptr;
}
static values_fn pick_values(int gdt, bool drop) {
    switch (gdt) {
        case 0: return drop ? values_consume<F32, true> : values_consume<F32, false>;
        case 1: return drop ? values_consume<BF16, true> : values_consume<BF16, false>;
        case 2: return drop ? values_consume<F16, true> : values_consume<F16, false>;
    }
    return nullptr;
}

// The backward's merge fused into the scatter: out[i] = base[i] + theta[g(i)] * keep(i) from the same ids.
struct MergeArgs {
    const float* theta;
    const void* base;
    void* out;
    gather_fn fn;
};

template <bool CONTIG>
static void scatter_tiles(const Ctx& c, u64 start, const int64_t* pos, int64_t t0, int64_t t1, int64_t n,
                          const void* grad, float* acc, scatter_fn fn, const MergeArgs* mg) {
    u32 ids[TILE];
    float ks[TILE];
    for (int64_t t = t0; t < t1; t++) {
        const int64_t off = t * TILE;
        const int m = (int)((n - off) < TILE ? (n - off) : TILE);
        ids_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ids);
        if (c.drop) keep_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ks);
        if (mg) mg->fn(ids, ks, mg->theta, mg->base, mg->out, off, m);
        fn(ids, ks, grad, acc, off, m);
    }
}

// Deterministic for a given thread count in every mode:
// - serial: one thread adds in position order;
// - private: thread t adds its contiguous share of positions into its own fp32 copy of the d-vector
//   (thread 0 directly into acc), then acc[j] += copy_1[j] + ... in a fixed order;
// - owner: for large d, per block of positions all threads compute ids and values, then thread t adds
//   those whose group falls in its own range of groups, in position order (identical to serial).
template <bool CONTIG>
static int scatter_impl(const Ctx& c, u64 start, const int64_t* pos, int64_t n, const void* grad, int gdt, float* acc,
                        const MergeArgs* mg) {
    scatter_fn fn = pick_scatter(gdt, c.drop);
    values_fn vfn = pick_values(gdt, c.drop);
    if (!fn || !vfn) return -2;
    const int64_t ntiles = (n + TILE - 1) / TILE;
    const int nt = threads_for(c, n);
    const u64 d = c.d;
    if (nt <= 1) {
        scatter_tiles<CONTIG>(c, start, pos, 0, ntiles, n, grad, acc, fn, mg);
        return 0;
    }
    const u64 extra = (u64)(nt - 1) * d;
    if (extra <= (u64)(2 * n) + 65536 && extra <= (u64(64) << 20)) {
        float* priv = (float*)std::calloc(extra ? extra : 1, sizeof(float));
        if (!priv) return -3;
#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int tid = 0, T = 1;
#endif
            const int64_t t0 = ntiles * tid / T, t1 = ntiles * (tid + 1) / T;
            float* mine = tid == 0 ? acc : priv + (u64)(tid - 1) * d;
            scatter_tiles<CONTIG>(c, start, pos, t0, t1, n, grad, mine, fn, mg);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t j = 0; j < (int64_t)d; j++) {
                float s = acc[j];
                for (int u = 1; u < T; u++) s += priv[(u64)(u - 1) * d + j];
                acc[j] = s;
            }
        }
        std::free(priv);
        return 0;
    }
    // owner mode
    const int64_t BLOCK = 64 * TILE;
    const size_t bsize = (size_t)(n < BLOCK ? n : BLOCK);
    std::vector<u32> bid(bsize);
    std::vector<float> bval(bsize);
    u32* ids_buf = bid.data();
    float* val_buf = bval.data();
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int tid = 0, T = 1;
#endif
        const u64 lo = d * (u64)tid / (u64)T, span = d * (u64)(tid + 1) / (u64)T - lo;
        float ks[TILE];
        for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
            const int64_t bn = (n - b0) < BLOCK ? (n - b0) : BLOCK;
            const int64_t bt = (bn + TILE - 1) / TILE;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < bt; t++) {
                const int64_t off = b0 + t * TILE;
                const int m = (int)((n - off) < TILE ? (n - off) : TILE);
                ids_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ids_buf + t * TILE);
                if (c.drop) keep_tile<CONTIG>(c, start + (u64)off, pos + (CONTIG ? 0 : off), m, ks);
                if (mg) mg->fn(ids_buf + t * TILE, ks, mg->theta, mg->base, mg->out, off, m);
                vfn(ks, grad, val_buf + t * TILE, off, m);
            }
            // (implicit barrier) the block's ids and values are ready: add those of my groups, in order
            for (int64_t i = 0; i < bn; i++) {
                const u32 g = ids_buf[i];
                if ((u64)g - lo < span) acc[g] += val_buf[i];
            }
#pragma omp barrier
        }
    }
    return 0;
}

// The first-round table for contiguous narrow slices long enough to repay it (2^b + TILE entries).
struct Round1Table {
    std::vector<u32> tab;
    Round1Table(Ctx& c, const int64_t* pos, int64_t n) {
        if (pos || c.grid || !c.narrow || c.b > 16) return;
        const int64_t len = ((int64_t)1 << c.b) + TILE;
        if (n < 2 * len) return;
        tab.resize((size_t)len);
        const u32 k0 = c.k0, ma = c.ma, mb = c.mb;
        u32* t = tab.data();
        for (int64_t j = 0; j < len; j++) t[j] = rf((u32)j & mb, k0) & ma;
        c.t0 = t;
    }
};

// ---- entry points ------------------------------------------------------------------------------

extern "C" {

int gpart_abi(void) { return GPART_ABI; }

// ids (int64) of positions start.. (pos == NULL) or pos[0..n)
int gpart_ids(const GPartParams* p, u64 start, const int64_t* pos, int64_t n, int64_t* out) {
    Ctx c = make_ctx(p);
    if (c.d > (u64(1) << 32)) return -1;
    if (pos && !positions_ok(pos, n, c.D)) return -4;
    Round1Table r1(c, pos, n);
    const int64_t ntiles = (n + TILE - 1) / TILE;
    const int nt = threads_for(c, n);
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
    for (int64_t t = 0; t < ntiles; t++) {
        u32 ids[TILE];
        const int64_t off = t * TILE;
        const int m = (int)((n - off) < TILE ? (n - off) : TILE);
        if (pos) ids_tile<false>(c, 0, pos + off, m, ids);
        else ids_tile<true>(c, start + (u64)off, nullptr, m, ids);
        for (int i = 0; i < m; i++) out[off + i] = (int64_t)ids[i];
    }
    return 0;
}

// out[i] = base[i] + theta[g(i)] * keep(i)   (base may be NULL; base == out adds in place)
int gpart_gather(const GPartParams* p, u64 start, const int64_t* pos, int64_t n, const float* theta,
                 const void* base, int bdt, void* out, int odt) {
    Ctx c = make_ctx(p);
    if (c.d > (u64(1) << 32)) return -1;
    if (pos && !positions_ok(pos, n, c.D)) return -4;
    Round1Table r1(c, pos, n);
    gather_fn fn = pick_gather(base ? bdt : -1, odt, c.drop);
    if (!fn) return -2;
    if (pos) gather_impl<false>(c, 0, pos, n, theta, base, out, fn);
    else gather_impl<true>(c, start, nullptr, n, theta, base, out, fn);
    return 0;
}

// acc[g(i)] += grad[i] * keep(i)
int gpart_scatter(const GPartParams* p, u64 start, const int64_t* pos, int64_t n, const void* grad, int gdt,
                  float* acc) {
    Ctx c = make_ctx(p);
    if (c.d > (u64(1) << 32)) return -1;
    if (pos && !positions_ok(pos, n, c.D)) return -4;
    Round1Table r1(c, pos, n);
    if (pos) return scatter_impl<false>(c, 0, pos, n, grad, gdt, acc, nullptr);
    return scatter_impl<true>(c, start, nullptr, n, grad, gdt, acc, nullptr);
}

// The backward in one sweep: out[i] = base[i] + theta[g(i)] * keep(i) (as gpart_gather) and
// acc[g(i)] += grad[i] * keep(i) (as gpart_scatter), computing each id once.
int gpart_merge_scatter(const GPartParams* p, u64 start, const int64_t* pos, int64_t n, const float* theta,
                        const void* base, int bdt, void* out, int odt, const void* grad, int gdt, float* acc) {
    Ctx c = make_ctx(p);
    if (c.d > (u64(1) << 32)) return -1;
    if (pos && !positions_ok(pos, n, c.D)) return -4;
    Round1Table r1(c, pos, n);
    MergeArgs mg{theta, base, out, pick_gather(base ? bdt : -1, odt, c.drop)};
    if (!mg.fn) return -2;
    if (pos) return scatter_impl<false>(c, 0, pos, n, grad, gdt, acc, &mg);
    return scatter_impl<true>(c, start, nullptr, n, grad, gdt, acc, &mg);
}

}  // extern "C"
