"""Weight-only quantized linear layers that keep their weights packed.

Three layouts, all computed with bfloat16 activations:

- `Int8Linear`: int8 weights with one scale per output channel
  (`aten._weight_int8pack_mm` on the CPU; on CUDA a dequantize-and-matmul that
  torch.compile fuses into one kernel).
- `Int4Linear`: 4-bit weights in groups along the input dimension, each group with a
  scale and a zero point, value = (q - 8) * scale + zero
  (`aten._weight_int4pack_mm_for_cpu` on the CPU, `aten._weight_int4pack_mm` on CUDA;
  each device has its own packed layout, private to the kernel and on the CPU different
  per instruction set, so a layer is packed on the device it runs on and only the
  matmul reads it).
  GGUF's Q4_0 and Q4_1 blocks (32 values, an fp16 scale and, for Q4_1, an fp16 minimum)
  are exactly this form, so GGUF files map onto it without re-quantizing.
- `GGUFLinear`: a GGUF file's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks
  as stored (what Q4_K_M / Q5_K_M files mix), computed by llama2's own CPU kernels
  (`llama2.kernels`) where they build; the layouts above are the fallback.

Quantization is a module swap after loading (`quantize_model`); the model code never
knows about it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from torch import nn

from .errors import Llama2Error
from .weights.dequant import block_size_bytes, dequantize, dequantize_blocks

INT4_INNER_K_TILES = 2
# From this many rows (prefill) a dense bfloat16 GEMM on the unpacked weight beats the int4 kernel...
DENSE_MIN_ROWS = 32
# ...when the weight unpacks within the caches (~0.7 ns a value; a 4096 x 4096 weight takes
# ~6 ns a value, more than the int4 kernel spends on a 512-row chunk).
DENSE_MAX_WEIGHT_VALUES = 2**21
QUANT_TYPES = ("int8", "int4")
# GGUF block types whose layers are computed on packed weights (llama2's kernels or PyTorch's).
PACKED_GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 [out, in] and a bfloat16 scale per output row."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.register_buffer("weight", weight_int8.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, rows_per_chunk: int = 4096) -> Int8Linear:
        """Symmetric per-channel quantization of a float weight [out, in], a few rows at a time."""
        return cls.from_row_chunks(
            lambda start, end: weight[start:end], tuple(weight.shape), rows_per_chunk, weight.device
        )

    @classmethod
    def from_row_chunks(cls, read_rows, shape: tuple[int, int], rows_per_chunk: int = 4096, device=None) -> Int8Linear:
        """Per-channel quantization of a weight [out, in] handed over `rows_per_chunk` rows at a time.

        Args:
            read_rows: `read_rows(start, end)` returns rows start..end-1 as a float tensor,
                so the whole float weight never needs to exist at once.
        """
        q = torch.empty(shape, dtype=torch.int8, device=device)
        scales = torch.empty(shape[0], dtype=torch.float32, device=device)
        for start in range(0, shape[0], rows_per_chunk):
            end = min(start + rows_per_chunk, shape[0])
            rows = read_rows(start, end).float()
            row_scales = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q[start:end] = torch.round(rows / row_scales[:, None]).clamp(-128, 127)
            scales[start:end] = row_scales
        return cls(q, scales)

    @classmethod
    def concat(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer computing `layers`' outputs side by side."""
        return cls(torch.cat([layer.weight for layer in layers]), torch.cat([layer.scales for layer in layers]))

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # compiled: one fused reduction


class Int4Linear(nn.Module):
    """y = x W^T with W in 4-bit groups: W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n].

    The weight is packed for PyTorch's int4 matmul on its device. That layout is the
    kernel's own (on the CPU it changes with the instruction set PyTorch dispatches to),
    so nothing here reads it: the 4-bit values come back through the matmul itself
    (`read_int4pack`). Small CPU weights also keep their values as plain nibble pairs
    (half a byte a value) so that prefill chunks can decode them for one dense GEMM.
    """

    def __init__(self, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
        """
        Args:
            q: unsigned 4-bit values [out, in] (0..15), any integer dtype, on the device to run on.
            scales_and_zeros: [in // group_size, out, 2] (scale, zero).
            group_size: values per group along the input dimension.
        """
        super().__init__()
        out_features, in_features = q.shape
        if in_features % (INT4_INNER_K_TILES * 16) or in_features % group_size:
            raise Llama2Error(f"int4 needs in_features divisible by 32 and the group size, got {in_features}")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.register_buffer(
            "scales_and_zeros", scales_and_zeros.to(device=q.device, dtype=torch.bfloat16).contiguous()
        )
        self.register_buffer("weight_packed", pack_int4(q))
        dense_prefill = q.device.type == "cpu" and out_features * in_features <= DENSE_MAX_WEIGHT_VALUES
        self.register_buffer("nibbles", pack_nibbles(q) if dense_prefill else None)

    @classmethod
    def concat(cls, layers: list[Int4Linear]) -> Int4Linear | None:
        """One layer computing `layers`' outputs side by side; None unless they share input size and group size.

        The 4-bit values are read back (`codes`), joined and packed again, so this costs a
        matmul of `in_features` rows per layer that keeps no nibbles (large weights).
        """
        first = layers[0]
        if any(layer.group_size != first.group_size or layer.in_features != first.in_features for layer in layers):
            return None
        q = torch.cat([layer.codes() for layer in layers])
        scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)  # [G, N, 2]
        return cls(q, scales_and_zeros, first.group_size)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Linear:
        """Asymmetric grouped quantization (min/max per group) of a float weight [out, in]."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)  # [N, G, g]
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        zero = low + 8 * scale
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [G, N, 2]
        return cls(q.reshape(out_features, in_features).to(torch.uint8), scales_and_zeros, group_size)

    @classmethod
    def from_q4_blocks(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> Int4Linear:
        """From GGUF Q4_0 (value = d * (q - 8)) or Q4_1 (value = d * q + m) blocks of 32.

        Args:
            q: [out, in] 4-bit values 0..15.
            scale: [out, in // 32] block scales d.
            minimum: [out, in // 32] block minimums m (Q4_1), or None (Q4_0).
        """
        zero = torch.zeros_like(scale) if minimum is None else minimum + 8 * scale
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [G, N, 2]
        return cls(q, scales_and_zeros.float(), 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.nibbles is not None and flat.shape[0] >= DENSE_MIN_ROWS:
            # Many rows (prefill) on a small CPU weight: decode it to bfloat16, one GEMM.
            return F.linear(x.to(torch.bfloat16), self.dequantize(torch.bfloat16)).to(x.dtype)
        out = int4pack_mm(flat.to(torch.bfloat16), self.weight_packed, self.group_size, self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def codes(self) -> torch.Tensor:
        """The 4-bit values q [out, in] (uint8, 0..15) this layer holds."""
        if self.nibbles is not None:
            return unpack_nibbles(self.nibbles)
        return read_int4pack(self.weight_packed, self.group_size, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] this layer computes: (q - 8) * scale + zero per group, in float32, then `dtype`."""
        q = self.codes().reshape(self.out_features, -1, self.group_size).float()  # [N, G, g]
        scale = self.scales_and_zeros[..., 0].T.float().unsqueeze(-1)  # [N, G, 1]
        zero = self.scales_and_zeros[..., 1].T.float().unsqueeze(-1)
        return ((q - 8) * scale + zero).reshape(self.out_features, self.in_features).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q [N, K] (0..15) packed for PyTorch's int4 matmul on q's device (CUDA's, else the CPU's).

    Whole weights are packed at once: the layouts are private to the kernels (the CPU's
    differs with the instruction set), so no assumption about row blocks splits the
    work; the CPU packer's int32 copy costs 4 bytes a value while it runs.
    """
    if q.device.type == "cuda":  # the op's documented input: [N, K / 2] bytes, even columns in the high nibble
        q = q.to(torch.int32)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INT4_INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INT4_INNER_K_TILES)


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) times a `pack_int4` weight's transpose with PyTorch's int4 kernel for its device: [M, N]."""
    if packed.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def read_int4pack(
    packed: torch.Tensor, group_size: int, out_features: int, in_features: int, columns_per_call: int = 512
) -> torch.Tensor:
    """The 4-bit values [N, K] (uint8, 0..15) inside a `pack_int4` weight, read through the matmul itself.

    With every group's scale 1 and zero 8 the weight's values are its 4-bit values, and
    rows of the identity give them back exactly: each output is one product with 1 plus
    products with 0, a small integer that bfloat16 holds. No packed layout is assumed;
    the cost is a matmul of K rows (`columns_per_call` at a time, bounding the memory).
    """
    n, k = out_features, in_features
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=packed.device)
    unit_scales_and_zeros = unit.expand(k // group_size, n, 2).contiguous()
    codes = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    for start in range(0, k, columns_per_call):
        end = min(start + columns_per_call, k)
        identity_rows = torch.zeros(end - start, k, dtype=torch.bfloat16, device=packed.device)
        identity_rows[:, start:end] = torch.eye(end - start, dtype=torch.bfloat16, device=packed.device)
        codes[:, start:end] = int4pack_mm(identity_rows, packed, group_size, unit_scales_and_zeros).T.to(torch.uint8)
    return codes


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [N, K] as bytes [N, K / 2]: column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | q[:, 1::2] << 4).contiguous()


def unpack_nibbles(pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [N, K / 2] bytes -> [N, K] uint8 values."""
    return torch.stack((pairs & 0x0F, pairs >> 4), dim=-1).reshape(pairs.shape[0], -1)


class GGUFLinear(nn.Module):
    """y = x W^T computed straight from a GGUF tensor's blocks (a `PACKED_GGUF_TYPES` type), kept as stored.

    Few rows (decode) go through llama2's kernel (`llama2.kernels`: activations quantized
    per block of 32 to int8, as llama.cpp does; a K-quant super-block of 256 values counts
    as 8 blocks of 32 with exact fp32 scales); prefill chunks on small weights decode the
    blocks to bfloat16 (`gguf_dequantize`) for one GEMM. The layer's memory is the file's bytes.
    """

    def __init__(self, blocks: torch.Tensor, type_name: str, shape: tuple[int, int]):
        """
        Args:
            blocks: the tensor's uint8 block bytes (any shape, read flat).
            type_name: one of `PACKED_GGUF_TYPES`.
            shape: the weight's (out, in).

        Raises:
            Llama2Error: if the rows are not whole blocks (K-quants: 256 values) or the bytes do not fit.
        """
        super().__init__()
        self.out_features, self.in_features = shape
        self.type_name = type_name
        self.qtype = int(GGMLQuantizationType[type_name])
        block_values, block_bytes = block_size_bytes(self.qtype)
        row_bytes = self.in_features // block_values * block_bytes
        if self.in_features % block_values or blocks.numel() != self.out_features * row_bytes:
            raise Llama2Error(
                f"a {type_name} weight of shape {tuple(shape)} needs rows of whole {block_values}-value "
                f"blocks ({blocks.numel()} bytes given)"
            )
        self.register_buffer("blocks", blocks.reshape(self.out_features, -1).contiguous())  # [out, row bytes]

    @classmethod
    def concat(cls, layers: list[GGUFLinear]) -> GGUFLinear | None:
        """One layer computing `layers`' outputs side by side (same type and input size), else None."""
        first = layers[0]
        if any(layer.type_name != first.type_name or layer.in_features != first.in_features for layer in layers):
            return None
        out_features = sum(layer.out_features for layer in layers)
        return cls(torch.cat([layer.blocks for layer in layers]), first.type_name, (out_features, first.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        small_weight = self.in_features * self.out_features <= DENSE_MAX_WEIGHT_VALUES
        if flat.shape[0] >= DENSE_MIN_ROWS and small_weight:
            weight = torch.ops.llama2_kernels.gguf_dequantize(
                self.blocks, self.qtype, self.out_features, self.in_features
            )
            return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
        out = torch.ops.llama2_kernels.gguf_matmul(flat, self.blocks, self.qtype, self.out_features, self.in_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the blocks hold."""
        return self.dequantize_rows(self.blocks).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [n, in] values of block rows [n, row bytes] of this layer's type."""
        blocks = rows.reshape(-1, block_size_bytes(self.qtype)[1])  # [n * in / 32, block bytes]
        return dequantize_blocks(blocks, self.qtype).reshape(rows.shape[0], self.in_features)


class QuantizedEmbedding(nn.Module):
    """Embedding lookup from the rows of a quantized head (`Int8Linear` or `GGUFLinear`, shared when tied)."""

    def __init__(self, table: Int8Linear | GGUFLinear, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.float_rows(tokens).to(self.dtype)

    def float_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The table's rows for `tokens` ([...] -> [..., dim]) in float32, as the table holds them."""
        if isinstance(self.table, GGUFLinear):
            rows = self.table.dequantize_rows(self.table.blocks[tokens.reshape(-1)])  # [B * T, dim]
            return rows.reshape(*tokens.shape, -1)
        rows = self.table.weight[tokens].to(torch.float32)  # [..., dim]
        return rows * self.table.scales[tokens].float().unsqueeze(-1)


QUANTIZERS = {"int8": Int8Linear.from_float, "int4": Int4Linear.from_float}


def decode_rows_per_pass(model: nn.Module) -> int:
    """The most one-token rows a forward of `model` takes while computing each row as if alone.

    Packed layers (`Int4Linear`, `GGUFLinear`) switch kernels, and with them rounding, at
    `DENSE_MIN_ROWS` rows; every model is held below that bound today, so all batch alike.
    """
    return DENSE_MIN_ROWS - 1


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Swap a Transformer's linear layers for packed quantized ones, in place.

    The transformer blocks' linears become `kind` ("int8" or "int4" in groups of 32);
    the output head becomes int8 (an int4 head costs accuracy) and, when the
    embeddings are tied, the embedding lookup reads the same int8 table.
    """
    if kind not in QUANTIZERS:
        raise Llama2Error(f"unknown quantization {kind!r}; choose one of {', '.join(QUANT_TYPES)}")
    quantizer = QUANTIZERS[kind]
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantizer(child.weight.detach()))
    quantize_head(model)
    return model


def quantize_head(model: nn.Module) -> None:
    """Make the output head and the embedding lookup int8 (one shared table when tied)."""
    tables = {"tok_embeddings.weight": Int8Linear.from_float(model.tok_embeddings.weight.detach())}
    if isinstance(model.output, nn.Linear):
        tables["output.weight"] = Int8Linear.from_float(model.output.weight.detach())
    install_quantized_head(model, tables, model.norm.weight.dtype)


def install_quantized_head(model: nn.Module, tables: dict[str, Int8Linear | GGUFLinear], dtype: torch.dtype) -> None:
    """Use quantized tables as the embedding lookup and output head.

    Args:
        tables: ``"tok_embeddings.weight"`` (and ``"output.weight"`` for an untied head).
        dtype: activation dtype the embedding lookup returns.
    """
    embedding = tables["tok_embeddings.weight"]
    model.output = tables.get("output.weight", embedding)
    model.tok_embeddings = QuantizedEmbedding(embedding, dtype)


def unpack_q4_blocks(raw: torch.Tensor, shape: tuple[int, int], has_minimum: bool):
    """Split GGUF Q4_0/Q4_1 block bytes into 4-bit values, scales and minimums.

    Each block of 32 values is an fp16 scale d (Q4_1: then an fp16 minimum m) and 16
    bytes whose low nibbles are values 0..15 and high nibbles values 16..31.

    Args:
        raw: uint8 block bytes of a tensor with torch shape `shape` = (out, in).
        shape: (out, in).
        has_minimum: Q4_1 (True) or Q4_0 (False).

    Returns:
        (q [out, in] uint8, scale [out, in // 32] float32, minimum [out, in // 32] float32 or None).
    """
    out_features, in_features = shape
    header = 4 if has_minimum else 2
    blocks = raw.reshape(out_features, in_features // 32, header + 16)  # [N, G, bytes]
    halves = blocks[..., :header].contiguous().view(torch.float16).float()  # [N, G, 1 or 2]
    nibbles = blocks[..., header:]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # [N, G, 32]
    minimum = halves[..., 1] if has_minimum else None
    return q.reshape(out_features, in_features), halves[..., 0], minimum


def int4_from_gguf(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> Int4Linear:
    """An `Int4Linear` computing exactly a GGUF Q4_0/Q4_1 tensor's values (scales in bfloat16)."""
    q, scale, minimum = unpack_q4_blocks(raw, shape, type_name == "Q4_1")
    return Int4Linear.from_q4_blocks(q, scale, minimum)


def int8_from_gguf(raw: torch.Tensor, type_name: str, shape: tuple[int, int], rows_per_chunk: int = 1024) -> Int8Linear:
    """An `Int8Linear` from any GGUF 2-D tensor's bytes (Q8_0 blocks re-scaled per row, a Q4_0 table, F16, ...).

    GGML rows are whole blocks, so the bytes are decoded `rows_per_chunk` rows at a time:
    a 32000 x 4096 table never exists as float32 (which would be 0.5 GB).
    """
    qtype = GGMLQuantizationType[type_name]
    row_bytes = raw.numel() // shape[0]
    flat = raw.reshape(-1)

    def read_rows(start: int, end: int) -> torch.Tensor:
        return dequantize(flat[start * row_bytes : end * row_bytes], qtype, (end - start, shape[1]))

    return Int8Linear.from_row_chunks(read_rows, shape, rows_per_chunk, raw.device)


def gguf_layer(
    raw: torch.Tensor, type_name: str, shape: tuple[int, int], keep_blocks: bool, int4: bool = True
) -> nn.Module:
    """The layer computing a GGUF tensor's values from its blocks.

    Args:
        keep_blocks: use the blocks as stored (`GGUFLinear`, needs llama2's kernel and a
            `PACKED_GGUF_TYPES` tensor); else repack them for PyTorch's kernels
            (Q4_0 / Q4_1 as `Int4Linear`, anything else as per-channel `Int8Linear`).
        int4: allow `Int4Linear` (an output head is better off int8).
    """
    if keep_blocks and type_name in PACKED_GGUF_TYPES:
        return GGUFLinear(raw, type_name, shape)
    if int4 and type_name in ("Q4_0", "Q4_1"):
        return int4_from_gguf(raw, type_name, shape)
    return int8_from_gguf(raw, type_name, shape)
