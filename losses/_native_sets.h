/* _native_body.h for float and double, included by losses/_native.c once per instruction set:
   the functions are named x_f32SET and x_f64SET (SET empty, or e.g. _avx2), with the float32
   exponential EXP32 and logarithm on [1, 2] LOG32 of that set (float64 takes libm's). The body
   undefines its parameters (T, I, IEXP, FN, BIG, EXP, LOG1, FLOOR) at its end. */
#define NATIVE_CAT2(a, b) a##b
#define NATIVE_CAT(a, b) NATIVE_CAT2(a, b)

#define T float
#define I int32_t
#define IEXP ((int32_t)0x7f800000)
#define FN(x) NATIVE_CAT(x##_f32, SET)
#define BIG FLT_MAX
#define EXP(x) EXP32(x)
#define LOG1(x) LOG32(x)
#define FLOOR (-87.0f)
#include "_native_body.h"

#define T double
#define I int64_t
#define IEXP ((int64_t)0x7ff0000000000000LL)
#define FN(x) NATIVE_CAT(x##_f64, SET)
#define BIG DBL_MAX
#define EXP(x) exp(x)
#define LOG1(x) log(x)
#define FLOOR (-708.0)
#include "_native_body.h"

#undef NATIVE_CAT
#undef NATIVE_CAT2
