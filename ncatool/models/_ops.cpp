// The kernels of _kernels.c as PyTorch operators: torch.ops.ncatool.<name> (see kernels.py).
//
// Each operator has a typed schema, so the dispatcher converts and checks the Python arguments,
// and its CPU implementation checks what the schema cannot say (dtype, memory layout, sizes that
// must agree, index ranges) with TORCH_CHECK before it hands raw pointers to C: a wrong call raises
// a RuntimeError naming the argument instead of reading or writing past a buffer.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "_kernels.h"

namespace {

using at::Tensor;

// B, D, H, W, C of a float32 channels-last (B, C, *S) state; 2D states have D = 1.
struct Geometry {
    int64_t B, D, H, W, C;
    int64_t cells() const { return B * D * H * W; }
};

Geometry check_state(const Tensor &x, const char *name) {
    TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU, got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 4 || x.dim() == 5, name, " must be (B, C, H, W) or (B, C, D, H, W), got ",
                x.sizes());
    const auto format = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    TORCH_CHECK(x.is_contiguous(format), name, " must be channels-last contiguous");
    TORCH_CHECK(x.size(1) > 0, name, " has no channels");
    if (x.dim() == 4) return {x.size(0), 1, x.size(2), x.size(3), x.size(1)};
    return {x.size(0), x.size(2), x.size(3), x.size(4), x.size(1)};
}

int padding_code(const std::string &padding) {
    if (padding == "zeros") return 0;
    if (padding == "reflect") return 1;
    if (padding == "replicate") return 2;
    TORCH_CHECK(padding == "circular", "padding must be zeros, reflect, replicate or circular, got '",
                padding, "'");
    return 3;
}

bool is_bf16(at::ScalarType dtype, const char *name) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, name, " must be float32 or bfloat16, got ",
                dtype);
    return dtype == at::kBFloat16;
}

// The cell indices idx (int64, 1-D) with every value in [0, cells); strictly increasing if `sorted`.
// One pass over n integers: cheap next to the rows' work, and an index outside the state would
// read or write outside it.
const int64_t *check_idx(const std::optional<Tensor> &idx, int64_t cells, bool sorted) {
    if (!idx.has_value()) return nullptr;
    const Tensor &t = *idx;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
                "idx must be a contiguous 1-D int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes());
    const int64_t *p = t.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < t.numel(); r++) {
        TORCH_CHECK(p[r] >= 0 && p[r] < cells, "idx[", r, "] = ", p[r], " is not a cell of the state (",
                    cells, " cells)");
        TORCH_CHECK(!sorted || r == 0 || p[r] > p[r - 1],
                    "idx must be strictly increasing (sorted, unique) for the backward, idx[", r, "] = ", p[r]);
    }
    return p;
}

// One group of depthwise filters of the same size: taps (nf, *k, C) float32 contiguous.
struct Group {
    const float *taps = nullptr;
    int nf = 0, rd = 0, rh = 0, rw = 0;
};

Group check_taps(const Tensor &taps, const Geometry &g, int dims, int mode, size_t i) {
    TORCH_CHECK(taps.device().is_cpu() && taps.scalar_type() == at::kFloat && taps.is_contiguous(),
                "taps[", i, "] must be a contiguous float32 CPU tensor");
    TORCH_CHECK(taps.dim() == dims + 2, "taps[", i, "] must be (filters, *kernel, C) with ", dims,
                " kernel axes, got ", taps.sizes());
    TORCH_CHECK(taps.size(0) > 0 && taps.size(-1) == g.C, "taps[", i, "] must be (filters >= 1, *kernel, C=",
                g.C, "), got ", taps.sizes());
    int64_t radius[3] = {0, 0, 0};
    int64_t taps_per_filter = 1;
    for (int a = 0; a < dims; a++) {
        const int64_t k = taps.size(1 + a);
        TORCH_CHECK(k % 2 == 1, "taps[", i, "]: kernel sizes must be odd, got ", taps.sizes());
        radius[3 - dims + a] = k / 2;
        taps_per_filter *= k;
    }
    TORCH_CHECK(taps_per_filter <= NCA_MAX_TAPS, "taps[", i, "]: ", taps_per_filter,
                " taps per filter, at most ", NCA_MAX_TAPS);
    if (mode == 1) {  // reflect reads x[r - i]: every axis must be longer than the radius
        const int64_t size[3] = {g.D, g.H, g.W};
        for (int a = 3 - dims; a < 3; a++)
            TORCH_CHECK(radius[a] < size[a], "reflect padding of radius ", radius[a],
                        " needs a longer axis than ", size[a]);
    }
    return {taps.const_data_ptr<float>(), static_cast<int>(taps.size(0)), static_cast<int>(radius[0]),
            static_cast<int>(radius[1]), static_cast<int>(radius[2])};
}

const float *check_bias(const std::optional<Tensor> &bias, const Group &group, int64_t C, size_t i) {
    if (!bias.has_value()) return nullptr;
    const Tensor &b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 2 &&
                    b.size(0) == group.nf && b.size(1) == C,
                "bias[", i, "] must be a contiguous float32 (", group.nf, ", ", C, ") CPU tensor, got ",
                b.scalar_type(), " ", b.sizes());
    return b.const_data_ptr<float>();
}

void check_code(int err, const char *name) {
    TORCH_CHECK(err == 0, name, " failed (code ", err, err == 1 ? ": too many taps)" : ": out of memory)");
}

Tensor perceive_rows_op(const Tensor &x, at::TensorList taps, const c10::List<std::optional<Tensor>> &bias,
                     c10::string_view padding, const std::optional<Tensor> &idx, at::ScalarType dtype) {
    const Geometry g = check_state(x, "x");
    const int mode = padding_code(std::string(padding));
    const bool bf16 = is_bf16(dtype, "dtype");
    TORCH_CHECK(bias.size() == taps.size(), "bias needs one entry per taps group (", taps.size(), "), got ",
                bias.size());
    const int dims = static_cast<int>(x.dim()) - 2;
    const int64_t *ip = check_idx(idx, g.cells(), false);
    const int64_t n = idx.has_value() ? idx->numel() : g.cells();
    std::vector<Group> groups;
    std::vector<const float *> biases;
    int64_t filters = 0;
    for (size_t i = 0; i < taps.size(); i++) {
        groups.push_back(check_taps(taps[i], g, dims, mode, i));
        biases.push_back(check_bias(bias.get(i), groups.back(), g.C, i));
        filters += groups.back().nf;
    }
    const int64_t width = g.C * (1 + filters);
    Tensor out = at::empty({n, width}, x.options().dtype(dtype));
    if (groups.empty()) groups.push_back(Group{}), biases.push_back(nullptr);  // the identity alone
    const int threads = at::get_num_threads();
    int64_t col = 0;
    for (size_t i = 0; i < groups.size(); i++) {
        const Group &k = groups[i];
        const int identity = i == 0;
        check_code(::perceive_rows(x.const_data_ptr<float>(), g.B, g.D, g.H, g.W, g.C, k.taps, biases[i], k.nf,
                                 identity, k.rd, k.rh, k.rw, mode, ip, n, out.data_ptr(), width, col, bf16,
                                 threads),
                   "perceive_rows");
        col += g.C * (identity + k.nf);
    }
    return out;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> perceive_rows_backward_op(
    const Tensor &x, at::TensorList taps, c10::string_view padding, const std::optional<Tensor> &idx,
    const Tensor &grad, const std::optional<Tensor> &grad_x, const c10::List<bool> &need_taps,
    const c10::List<bool> &need_bias) {
    const Geometry g = check_state(x, "x");
    const int mode = padding_code(std::string(padding));
    const int dims = static_cast<int>(x.dim()) - 2;
    TORCH_CHECK(need_taps.size() == taps.size() && need_bias.size() == taps.size(),
                "need_taps and need_bias need one flag per taps group (", taps.size(), ")");
    const int64_t *ip = check_idx(idx, g.cells(), true);
    const int64_t n = idx.has_value() ? idx->numel() : g.cells();
    std::vector<Group> groups;
    int64_t filters = 0;
    for (size_t i = 0; i < taps.size(); i++) {
        groups.push_back(check_taps(taps[i], g, dims, mode, i));
        filters += groups.back().nf;
    }
    const int64_t width = g.C * (1 + filters);
    TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 2 && grad.is_contiguous() && grad.size(0) == n &&
                    grad.size(1) == width,
                "grad must be contiguous (rows=", n, ", ", width, "), got ", grad.sizes());
    const bool bf16 = is_bf16(grad.scalar_type(), "grad");
    float *gx = nullptr;
    if (grad_x.has_value()) {
        const Tensor &t = *grad_x;
        TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                        t.size(0) == g.cells() && t.size(1) == g.C,
                    "grad_x must be a contiguous float32 (cells=", g.cells(), ", C=", g.C, ") tensor, got ",
                    t.scalar_type(), " ", t.sizes());
        gx = t.data_ptr<float>();
    }
    std::vector<Tensor> grad_taps, grad_bias;
    const auto empty = [&] { return at::empty({0}, x.options()); };
    if (groups.empty()) groups.push_back(Group{});  // the identity alone
    const int threads = at::get_num_threads();
    int64_t col = 0;
    for (size_t i = 0; i < groups.size(); i++) {
        const Group &k = groups[i];
        const int identity = i == 0;
        const bool real = i < taps.size();
        Tensor gw = real && need_taps.get(i) ? at::zeros(taps[i].sizes(), x.options()) : empty();
        Tensor gb = real && need_bias.get(i) ? at::zeros({k.nf, g.C}, x.options()) : empty();
        if (gx || gw.numel() || gb.numel()) {
            check_code(::perceive_rows_bwd(x.const_data_ptr<float>(), g.B, g.D, g.H, g.W, g.C, k.taps, k.nf,
                                         identity, k.rd, k.rh, k.rw, mode, ip, n, grad.const_data_ptr(), width,
                                         col, bf16, gx, gw.numel() ? gw.data_ptr<float>() : nullptr,
                                         gb.numel() ? gb.data_ptr<float>() : nullptr, threads),
                       "perceive_rows_backward");
        }
        if (real) grad_taps.push_back(gw), grad_bias.push_back(gb);
        col += g.C * (identity + k.nf);
    }
    return {grad_taps, grad_bias};
}

// Checks shared by the update and its adjoint; returns the rows' cell indices (or null).
const int64_t *check_update(const Geometry &g, const std::optional<Tensor> &idx, int64_t fired, int64_t fixed) {
    TORCH_CHECK(fixed >= 0 && fixed < g.C, "fixed must be in [0, C=", g.C, "), got ", fixed);
    const int64_t *ip = check_idx(idx, g.cells(), true);  // unique: rows never write one cell twice
    const int64_t available = idx.has_value() ? idx->numel() : g.cells();
    TORCH_CHECK(fired >= 0 && fired <= available, "fired must be in [0, ", available, "], got ", fired);
    return ip;
}

std::tuple<Tensor, Tensor> update_rows_op(const Tensor &x, const Tensor &dx, const std::optional<Tensor> &idx,
                                       int64_t fired, int64_t fixed, std::optional<int64_t> alive_channel,
                                       double alive_threshold) {
    const Geometry g = check_state(x, "x");
    const int64_t *ip = check_update(g, idx, fired, fixed);
    TORCH_CHECK(dx.device().is_cpu() && dx.dim() == 2 && dx.is_contiguous() && dx.size(1) == g.C - fixed &&
                    dx.size(0) >= fired,
                "dx must be contiguous (rows >= fired=", fired, ", C - fixed=", g.C - fixed, "), got ",
                dx.sizes());
    const bool bf16 = is_bf16(dx.scalar_type(), "dx");
    const int threads = at::get_num_threads();
    Tensor out = at::empty_like(x);
    ::update_rows(x.const_data_ptr<float>(), g.cells(), g.C, dx.const_data_ptr(), dx.size(1), bf16, ip, fired,
                  fixed, out.data_ptr<float>(), threads);
    if (!alive_channel.has_value()) return {out, at::empty({0}, x.options().dtype(at::kBool))};
    const int64_t channel = *alive_channel;
    TORCH_CHECK(channel >= 0 && channel < g.C, "alive_channel must be in [0, C=", g.C, "), got ", channel);
    Tensor pre = at::empty({g.cells()}, x.options().dtype(at::kBool));
    Tensor life = at::empty({g.cells()}, x.options().dtype(at::kBool));
    const float thr = static_cast<float>(alive_threshold);
    auto *pre_p = reinterpret_cast<uint8_t *>(pre.data_ptr<bool>());
    auto *life_p = reinterpret_cast<uint8_t *>(life.data_ptr<bool>());
    ::alive_mask(x.const_data_ptr<float>(), g.B, g.D, g.H, g.W, g.C, channel, thr, pre_p, threads);
    ::alive_mask(out.const_data_ptr<float>(), g.B, g.D, g.H, g.W, g.C, channel, thr, life_p, threads);
    ::apply_life(out.data_ptr<float>(), pre_p, life_p, g.cells(), g.C, threads);
    return {out, life};
}

std::tuple<Tensor, Tensor> update_rows_backward_op(const Tensor &grad, const std::optional<Tensor> &life,
                                                const std::optional<Tensor> &idx, int64_t fired, int64_t rows,
                                                int64_t fixed, at::ScalarType dtype) {
    const Geometry g = check_state(grad, "grad");
    const int64_t *ip = check_update(g, idx, fired, fixed);
    TORCH_CHECK(rows >= fired, "rows (", rows, ") must be at least fired (", fired, ")");
    const uint8_t *lp = nullptr;
    if (life.has_value()) {
        const Tensor &t = *life;
        TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBool && t.is_contiguous() &&
                        t.numel() == g.cells(),
                    "life must be a contiguous bool tensor of ", g.cells(), " cells, got ", t.scalar_type(), " ",
                    t.sizes());
        lp = reinterpret_cast<const uint8_t *>(t.const_data_ptr<bool>());
    }
    const bool bf16 = is_bf16(dtype, "dtype");
    Tensor gx = at::empty({g.cells(), g.C}, grad.options());
    Tensor gdx = at::empty({rows, g.C - fixed}, grad.options().dtype(dtype));
    ::update_rows_bwd(grad.const_data_ptr<float>(), lp, g.cells(), g.C, ip, fired, rows, fixed,
                      gx.data_ptr<float>(), gdx.data_ptr(), bf16, at::get_num_threads());
    return {gx, gdx};
}

Tensor &relu_backward_op(Tensor &grad, const Tensor &h) {
    TORCH_CHECK(grad.device().is_cpu() && h.device().is_cpu(), "grad and h must be CPU tensors");
    TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "grad and h must have one dtype, got ",
                grad.scalar_type(), " and ", h.scalar_type());
    const bool bf16 = is_bf16(grad.scalar_type(), "grad");
    TORCH_CHECK(grad.sizes() == h.sizes(), "grad and h must have one shape, got ", grad.sizes(), " and ",
                h.sizes());
    TORCH_CHECK(grad.is_contiguous() && h.is_contiguous(), "grad and h must be contiguous");
    ::relu_backward(grad.data_ptr(), h.const_data_ptr(), grad.numel(), bf16, at::get_num_threads());
    return grad;
}

Tensor mask_indices_op(const Tensor &mask) {
    TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous(),
                "mask must be a contiguous bool CPU tensor, got ", mask.scalar_type());
    Tensor out = at::empty({mask.numel()}, mask.options().dtype(at::kLong));
    const auto *mp = reinterpret_cast<const uint8_t *>(mask.const_data_ptr<bool>());
    const int64_t count = ::mask_indices(mp, mask.numel(), out.data_ptr<int64_t>());
    return out.narrow(0, 0, count);
}

}  // namespace

TORCH_LIBRARY(ncatool, m) {
    m.def("perceive_rows(Tensor x, Tensor[] taps, Tensor?[] bias, str padding, Tensor? idx, ScalarType dtype)"
          " -> Tensor");
    m.def("perceive_rows_backward(Tensor x, Tensor[] taps, str padding, Tensor? idx, Tensor grad, "
          "Tensor(a!)? grad_x, bool[] need_taps, bool[] need_bias) -> (Tensor[], Tensor[])");
    m.def("update_rows(Tensor x, Tensor dx, Tensor? idx, int fired, int fixed, int? alive_channel, "
          "float alive_threshold) -> (Tensor, Tensor)");
    m.def("update_rows_backward(Tensor grad, Tensor? life, Tensor? idx, int fired, int rows, int fixed, "
          "ScalarType dtype) -> (Tensor, Tensor)");
    m.def("relu_backward_(Tensor(a!) grad, Tensor h) -> Tensor(a!)");
    m.def("mask_indices(Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(ncatool, CPU, m) {
    m.impl("perceive_rows", &perceive_rows_op);
    m.impl("perceive_rows_backward", &perceive_rows_backward_op);
    m.impl("update_rows", &update_rows_op);
    m.impl("update_rows_backward", &update_rows_backward_op);
    m.impl("relu_backward_", &relu_backward_op);
    m.impl("mask_indices", &mask_indices_op);
}
