/* FP32 FMA peak of this CPU: independent chains of fused multiply-adds on full-width vector
 * registers, one chain set per thread, no memory traffic. The best of 5 timed repetitions is printed
 * as GFLOP/s (an FMA counts as 2 floating-point operations).
 *
 * With a third argument "bf16": the same for AVX512-BF16's dot product (vdpbf16ps: 16 lanes, each
 * adding two bf16 products to an fp32 sum, 64 operations), the peak of bf16 convolutions; 0 where
 * the compiler does not target AVX512-BF16.
 *
 * Build: gcc -O2 -march=native -ffp-contract=fast -fopenmp fma_peak.c -o fma_peak
 * Run:   ./fma_peak ITERATIONS THREADS [bf16]
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define VBYTES 64
#define CHAINS 12 /* 4-cycle latency x 2 FMA pipes, with margin; 32 registers available */
#elif defined(__AVX__)
#define VBYTES 32
#define CHAINS 10 /* 16 registers available */
#else
#define VBYTES 16
#define CHAINS 8
#endif
#define LANES (VBYTES / 4)

typedef float vf __attribute__((vector_size(VBYTES)));

/* One timed pass of ITERS iterations on each of THREADS threads; returns the sum of the accumulators
 * (printed, so that the compiler must compute them). */
typedef float (*pass_fn)(long iters, int threads);

static float fp32_pass(long iters, int threads) {
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        vf acc[CHAINS];
        vf mul, add;
        for (int l = 0; l < LANES; l++) {
            mul[l] = 0.9999999f;
            add[l] = 1e-7f * (float)(omp_get_thread_num() + 1);
        }
        for (int k = 0; k < CHAINS; k++)
            for (int l = 0; l < LANES; l++) acc[k][l] = (float)(k + l) * 1e-3f;
        for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
            for (int k = 0; k < CHAINS; k++) acc[k] = acc[k] * mul + add;
        }
        for (int k = 0; k < CHAINS; k++)
            for (int l = 0; l < LANES; l++) sink += acc[k][l];
    }
    return sink;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define BF16_OPS 64.0 /* per vdpbf16ps: 16 lanes x (2 products + 2 additions) */
static float bf16_pass(long iters, int threads) {
    float sink = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m512 acc[CHAINS];
        __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
        __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-7f), _mm512_set1_ps(-1e-7f));
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_set1_ps((float)k * 1e-3f);
        for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
        }
        for (int k = 0; k < CHAINS; k++) sink += _mm512_reduce_add_ps(acc[k]);
    }
    return sink;
}
#endif

/* The best GFLOP/s of 5 passes, OPS floating-point operations per chain and iteration. */
static double best_of_5(pass_fn pass, double ops, long iters, int threads, float *sink) {
    double best = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = omp_get_wtime();
        *sink += pass(iters, threads);
        double gflops = ops * CHAINS * (double)iters * threads / (omp_get_wtime() - t0) / 1e9;
        if (gflops > best) best = gflops;
    }
    return best;
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 200000000L;
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    float sink = 0.0f;
    if (argc > 3 && argv[3][0] == 'b') {
#if defined(__AVX512BF16__)
        double best = best_of_5(bf16_pass, BF16_OPS, iters, threads, &sink);
        printf("%.1f %g\n", best, (double)sink);
#else
        printf("0\n");
#endif
        return 0;
    }
    double best = best_of_5(fp32_pass, 2.0 * LANES, iters, threads, &sink); /* an FMA is 2 operations */
    printf("%.1f %d %d %g\n", best, VBYTES * 8, CHAINS, (double)sink);
    return 0;
}
