#pragma once
// The engine's own memory-bound loops: im2col / col2im for one image, padding and row copies,
// and the SGD update. Each is compiled for AVX-512, AVX2 and the
// baseline, and the loader picks the best the CPU runs (the rest of the engine is built for the
// baseline ISA, and the runs these loops copy are too short for a call to memcpy to pay off).
#include <cstdint>

namespace normkit::train::kernels {

// Geometry of a 2-D convolution over one NHWC image.
struct ConvGeometry {
  int64_t in_h, in_w, channels;  // input image (channels = C_in)
  int64_t out_h, out_w;
  int kernel, stride, pad;
};

// Overwrites col (rows [row_begin, row_end) of the out_h * out_w output pixels, kernel * kernel *
// channels floats each) with the patches of image (in_h * in_w * channels floats), zeros outside
// the image.
void im2col(const ConvGeometry& g, const float* image, float* col, int64_t row_begin,
            int64_t row_end);

// Adds the patch rows [row_begin, row_end) of dcol back onto dx (in_h * in_w * channels) where
// im2col read them, rows and taps in order.
void col2im_add(const ConvGeometry& g, const float* dcol, float* dx, int64_t row_begin,
                int64_t row_end);

// Overwrites padded with image (h * w * c floats) surrounded by `pad` zero pixels on every side,
// as rows of w + 2 * pad pixels, followed by 2 * pad zero pixels of slack:
// ((h + 2 * pad) * (w + 2 * pad) + 2 * pad) * c floats. A stride-1 convolution then reads each
// kernel tap as one matrix of consecutive pixels (see conv.h).
void pad_image(const float* image, int64_t h, int64_t w, int64_t c, int64_t pad, float* padded);

// dst row r (len floats at r * len) = src row r (len floats at r * src_stride), plus add row r
// (at r * len) when add is not null.
void copy_rows(float* dst, const float* src, int64_t rows, int64_t len, int64_t src_stride,
               const float* add);

// dst = src (n floats), or 0 when src is null.
void copy_or_zero(float* dst, const float* src, int64_t n);

// SGD with momentum and weight decay on n values: v = mu * v + (grad + wd * w); w -= lr * v.
void sgd_update(float* w, float* v, const float* grad, int64_t n, float lr, float mu, float wd);

}  // namespace normkit::train::kernels
