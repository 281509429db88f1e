#include <math.h>
#include <stdint.h>

#define UNSEEN (-5e29)
#define LANES 16
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* e^x for x <= 88 (Cephes expf: range reduction by ln 2, degree-5 polynomial, ~1 ulp); 0 below -87,
   where masked scores (-1e30) land: probabilities under e^-87 of a row's maximum are dropped. */
static inline float exp_f32(float x) {
    float keep = x > -87.0f ? 1.0f : 0.0f;
    x = x > -87.0f ? x : -87.0f;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
               + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    union { int32_t i; float f; } two;
    two.i = ((int32_t)n + 127) << 23;
    return y * two.f * keep;
}

/* One tile of scores s [rows, n] (row-major), centred on each row's current centre. For each row:
   update the running maximum m and its key top (j0 + column); when the maximum leaves [-T, T]
   (downward only if allow_down) shift the row's centre by d = m (d[r], else 0); overwrite the scores
   with p = exp(s - d); write l[r] = sum p and u[r] = sum p * (s - d). Returns how many rows shifted. */
int64_t wb_flash_step_f32(float* s, int64_t rows, int64_t n, float* m, int64_t* top, int64_t j0, float T,
                          int32_t allow_down, float* l, float* u, float* d) {
    int64_t moved = 0;
    for (int64_t r = 0; r < rows; r++) {
        float* x = s + r * n;
        v16f lm = (v16f){0} - INFINITY;
        v16i li = (v16i){0};
        v16i idx = (v16i){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        const v16i step = (v16i){0} + LANES;
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) {  /* first index of the maximum, 16 lanes at a time */
            v16f v;
            __builtin_memcpy(&v, x + j, sizeof v);
            v16i gt = v > lm;
            lm = (v16f)(((v16i)v & gt) | ((v16i)lm & ~gt));
            li = (idx & gt) | (li & ~gt);
            idx += step;
        }
        float bm = -INFINITY;
        int64_t bj = 0;
        for (int t = 0; t < LANES; t++)
            if (lm[t] > bm || (lm[t] == bm && li[t] < bj)) { bm = lm[t]; bj = li[t]; }
        for (; j < n; j++)
            if (x[j] > bm) { bm = x[j]; bj = j; }
        float mr = m[r];
        if (bm > mr) { mr = bm; top[r] = j0 + bj; }
        float dr = 0.0f;
        if (mr > UNSEEN && (mr > T || (allow_down && mr < -T))) { dr = mr; mr = 0.0f; moved++; }
        m[r] = mr;
        d[r] = dr;
        float ls = 0.0f, us = 0.0f;
        for (int64_t k = 0; k < n; k++) {
            float xv = x[k] - dr;
            float pv = exp_f32(xv);
            x[k] = pv;
            ls += pv;
            us += pv * xv;
        }
        l[r] = ls;
        u[r] = us;
    }
    return moved;
}

/* The same in double precision (libm exp; not vectorised: float64 is for tests and references). */
int64_t wb_flash_step_f64(double* s, int64_t rows, int64_t n, double* m, int64_t* top, int64_t j0, double T,
                          int32_t allow_down, double* l, double* u, double* d) {
    int64_t moved = 0;
    for (int64_t r = 0; r < rows; r++) {
        double* x = s + r * n;
        double bm = -INFINITY;
        int64_t bj = 0;
        for (int64_t j = 0; j < n; j++)
            if (x[j] > bm) { bm = x[j]; bj = j; }
        double mr = m[r];
        if (bm > mr) { mr = bm; top[r] = j0 + bj; }
        double dr = 0.0;
        if (mr > UNSEEN && (mr > T || (allow_down && mr < -T))) { dr = mr; mr = 0.0; moved++; }
        m[r] = mr;
        d[r] = dr;
        double ls = 0.0, us = 0.0;
        for (int64_t k = 0; k < n; k++) {
            double xv = x[k] - dr;
            double pv = xv > -745.0 ? exp(xv) : 0.0;
            x[k] = pv;
            ls += pv;
            us += pv * xv;
        }
        l[r] = ls;
        u[r] = us;
    }
    return moved;
}
