// The slice of libtorch's C++ API the kernels use: ATen's Tensor and the three factories they
// call, from ATen's per-operator headers.
//
// Why not <torch/types.h> (or <torch/extension.h>): those pull every operator's declaration
// (and the second one libtorch's whole C++ frontend), parsed again by each of the ~17 files;
// per file 3.4 s here against 8.2 and 27 (2-core Zen 4), which was most of a build's time.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
