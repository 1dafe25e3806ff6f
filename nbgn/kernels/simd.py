"""Loops written in LLVM IR with explicit vector types, where Numba's own loops fall short.

The channels-last normalization applies per-lane coefficients, ``y = (x - center[j]) * scale[j] +
shift[j]`` with ``j`` the position in a row of lanes. Numba's loops reload the three coefficients for
every vector of ``x``: LLVM cannot keep them in registers, since it cannot rule out that the lane
arrays alias ``x``. Four rows a loop share those loads and still ran at half the speed of a loop with
scalar coefficients (512 KiB in L2: 5.3 against 2.3 us). ``apply_rows`` loads a row's coefficients
into registers once, then streams through the rows like a contiguous loop (2.9 us): one code path
per row length, chosen by a switch. Rows too long for registers whose groups are whole vectors
(C = 2048, 32 groups) take ``apply_group_rows`` (in place, and out of place where a row of the
output fits too; with 64-byte vectors): a broadcast center per group instead of a row of them, so
that a row's coefficients fit the L1 beside it.

The channels-first normalization applies one ``(center, scale, shift)`` per channel, a run of
``spatial`` values. Numba's loop over a run of a few dozen values spends as much on its setup (alias
checks, a vector body unrolled to 64 values, a scalar remainder) as on the values. ``apply_channels``
broadcasts a channel's coefficients and runs through it in whole vectors, the last one ending on the
channel's last value (overlapping the one before it when the vectors do not divide the run): one
thread, in place, (1, 1024, 7, 7)/32 took 8.4 us against 11.4.

Out of place, where the input and the output together outgrow the L3 (``streams``), the long NCHW
channels are written by ``apply_streamed``: non-temporal stores of whole 64-byte lines, which
neither read the output's lines before writing them nor evict the input for them, the same DRAM
traffic as ``x *= a`` (``apply_run`` chooses; ``fence_streams`` orders them before a thread reports
its part done). ``apply_streamed_rows`` does the same for the NHWC rows of lanes, each started on
a line of the output (``streamed_rows_skew``), its coefficients loaded a vector at a time.

Shorter channels whose group is whole windows of a vector's (or half a vector's) worth of
channels take ``apply_channel_windows``: the window's scales and shifts in two registers, permuted
into each vector of ``x`` by a table of lane channels. Its loop loads ``x`` and the table, where a
flat loop against per-value patterns of weight and bias loads two more per vector: streaming from
L3 on one thread, the late layers' normalization took 123 us against 174 for the pattern loop and
102 for ``x *= a``.

The channels-last moments sum ``x - pivot`` and its square per lane. Where a row of whole vectors
is short enough (``_sum_row_vectors``), ``lane_sums_in_registers`` keeps both sums of a row's
lanes in registers across rows, adding them to the lanes in memory every ``SPILL_ROWS`` rows: one
sequential stream at about the speed of a plain sum, where the four-row sweeps load and store the
lane sums every four rows.

In place, the channel kernels take the last channel (or window) first, as
``moments.apply_reversed`` does; out of place the first, so that the output's lines are written in
ascending order. Where the output is not in cache, each store first reads its line for ownership,
and the prefetchers fetch ahead of ascending stores only: one thread, (128, 256, 14, 14)/32 float32
out of place, 4.6 ms last channel first against 1.6 ms first channel first.

The vectors are the host's widest (``row_limits``): 64 bytes with AVX-512, 32 with AVX2, else 16;
a row holds up to 512 bytes where there are 32 vector registers (AVX-512, and AArch64's NEON),
else 128, so that its coefficients and the data stay in registers.
"""

import functools
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .moments import (
    APPLY_CHUNK,
    aligned_full,
    apply_contiguous,
    apply_reversed,
    rounded_mean,
)


def _compiles_for_host() -> bool:
    """Whether Numba compiles for this machine, not for a CPU named or described in its config
    (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``: a cache built for other machines)."""
    return numba.config.CPU_FEATURES is None and numba.config.CPU_NAME in (None, "host")


@functools.cache
def _host_row_limits() -> tuple[int, int]:
    """``(vector_bytes, max_row_bytes)`` for this machine; see the module notes."""
    from llvmlite import binding

    if _compiles_for_host():
        features = binding.get_host_cpu_features()
    elif numba.config.CPU_FEATURES is not None:  # what Numba compiles for
        features = {f[1:]: f[0] == "+" for f in numba.config.CPU_FEATURES.split(",") if f}
    else:
        features = {}  # a named CPU whose features we do not know: no wide vectors assumed
    if features.get("avx512f", False):
        return 64, 512
    if features.get("avx2", False):
        return 32, 128
    if binding.get_process_triple().startswith(("aarch64", "arm64")):
        return 16, 512
    return 16, 128


def row_limits():
    """``(vector_bytes, max_row_bytes)``, constants of the compiled code (``_host_row_limits``)."""


@overload(row_limits, inline="always")
def _row_limits():
    limits = _host_row_limits()
    return lambda: limits


#: Where Linux describes the caches of CPU 0 (one ``index*`` folder per cache).
_CACHE_INFO = Path("/sys/devices/system/cpu/cpu0/cache")


def _cache_bytes(level: int, types_: tuple[str, ...]) -> int | None:
    """The size in bytes of CPU 0's first cache of ``level`` and one of ``types_`` as Linux
    describes it, or None where it does not."""
    try:
        for index in _CACHE_INFO.glob("index*"):
            if (index / "level").read_text().strip() == str(level) and (
                index / "type"
            ).read_text().strip() in types_:
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * 1024 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        pass
    return None


@functools.cache
def _host_l1_data_bytes() -> int:
    """A core's L1 data cache in bytes, as Linux reports it for CPU 0; 32 KiB (the smallest in
    current x86 and Arm server cores) where it does not, or where Numba compiles for a named CPU
    rather than this host (a cache built for other machines). On a hybrid CPU, CPU 0 is usually a
    performance core, whose L1 may be larger than the others'."""
    if not _compiles_for_host():
        return 32 * 1024
    size = _cache_bytes(1, ("Data", "Unified"))
    return 32 * 1024 if size is None else size


def l1_data_bytes():
    """A core's L1 data cache in bytes, a constant of the compiled code (``_host_l1_data_bytes``)."""


@overload(l1_data_bytes, inline="always")
def _l1_data_bytes():
    size = _host_l1_data_bytes()
    return lambda: size


#: Out of place, where the input and the output together fill at least this fraction of the L3,
#: the long runs' stores stream past the caches (``apply_run``): three quarters of the shared
#: cache, where glibc's memcpy (before 2.33) began to copy with non-temporal stores. Measured
#: between 20 and 24 MiB here (see ``streams``).
STREAM_L3_FRACTION = 0.75


@functools.cache
def _host_stream_bytes() -> int | None:
    """Bytes of input and output together from which out-of-place runs stream (``streams``):
    ``STREAM_L3_FRACTION`` of the L3 Linux reports for CPU 0. None (never) without an L3 to read,
    where Numba compiles for a named CPU, or off x86-64, where it was not measured."""
    from llvmlite import binding

    if not _compiles_for_host() or not binding.get_process_triple().startswith("x86_64"):
        return None
    size = _cache_bytes(3, ("Unified",))
    return None if size is None else int(size * STREAM_L3_FRACTION)


def streams(x, out):
    """Whether ``apply_run`` streams the normalization of flat ``x`` into ``out``: never in place
    (``out=None``); else where both arrays together reach ``_host_stream_bytes()`` (a constant of
    the compiled code) and ``out`` is aligned to its items.

    Below that, an output written through the caches fits beside ``x`` and is still there for the
    next call or layer. Out of place, two threads, (N, 128, 4096)/16 float32 with ordinary
    stores against streaming (a probe of these loops, into a warm output): 10 MiB each way, 0.31
    against 0.43 ms; 12 MiB, 0.94 against 0.59; 16 MiB, 1.01 against 0.72.

    The limit is a constant of the compiled code, as ``l1_data_bytes`` is: a cache of compiled
    kernels moved to a host of the same CPU but another L3 keeps the limit it was built with.
    """


def _never_streams(out) -> bool:
    """Whether no call with an ``out`` of this Numba type streams: in place, or on a host where
    nothing does (``_host_stream_bytes``). The overloads below then compile none of it."""
    return isinstance(out, types.NoneType) or _host_stream_bytes() is None


@overload(streams, inline="always")
def _streams(x, out):
    if _never_streams(out):
        return lambda x, out: False
    limit = _host_stream_bytes()
    return lambda x, out: (
        x.size * x.itemsize + out.size * out.itemsize >= limit
        and out.ctypes.data % out.itemsize == 0
    )


def _float_input_and_output(x, out):
    """Whether the Numba types ``x`` and ``out`` are a float32/float64 array and None or an array
    of the same dtype, as the intrinsics below take them."""
    if not isinstance(x, types.Array) or x.dtype not in (types.float32, types.float64):
        return False
    return isinstance(out, types.NoneType) or (
        isinstance(out, types.Array) and out.dtype == x.dtype
    )


def _table_like(table, x):
    """Whether the Numba type ``table`` is a C-contiguous 2-D array of x's dtype."""
    return (
        isinstance(table, types.Array)
        and table.dtype == x.dtype
        and table.ndim == 2
        and table.layout == "C"
    )


@intrinsic
def _apply_rows(typingctx, x, out, start, rows, row_vectors, center, scale, shift):
    if not _float_input_and_output(x, out):
        return None
    floats = (types.float32, types.float64)
    if any(not isinstance(a, types.Array) or a.dtype not in floats for a in (center, scale, shift)):
        return None
    signature = types.void(x, out, types.intp, types.intp, types.intp, center, scale, shift)
    in_place = isinstance(out, types.NoneType)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        target = x_array if in_place else context.make_array(sig.args[1])(context, builder, args[1])
        first, num_rows, num_vectors = args[2], args[3], args[4]
        lane_arrays = [
            context.make_array(sig.args[k])(context, builder, args[k]) for k in (5, 6, 7)
        ]
        lane_types = [context.get_data_type(sig.args[k].dtype) for k in (5, 6, 7)]
        element = context.get_data_type(sig.args[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        vector_bytes, max_row_bytes = _host_row_limits()
        lanes = vector_bytes // itemsize
        vector_type = ir.VectorType(element, lanes)
        vector_pointer = vector_type.as_pointer()
        intp = context.get_value_type(types.intp)
        function = builder.function
        done = function.append_basic_block("rows.done")
        switch = builder.switch(num_vectors, done)
        for count in range(1, max_row_bytes // vector_bytes + 1):
            case = function.append_basic_block(f"rows.{count}")
            switch.add_case(ir.Constant(intp, count), case)
            builder.position_at_end(case)
            # The row's coefficients, loaded once: count vectors of each, in x's dtype (lanes of
            # float64 sums hold values already rounded to float32: the conversion is exact).
            coefficients = [
                [
                    _load_as(builder, array, v * lanes, lanes, lane_type, vector_type, intp)
                    for v in range(count)
                ]
                for array, lane_type in zip(lane_arrays, lane_types, strict=True)
            ]
            row, body = _loop_from_zero(builder, f"rows.{count}", num_rows, done, intp)
            row_start = builder.add(first, builder.mul(row, ir.Constant(intp, count * lanes)))
            for v in range(count):
                index = builder.add(row_start, ir.Constant(intp, v * lanes))
                source = builder.bitcast(builder.gep(x_array.data, [index]), vector_pointer)
                value = builder.load(source, align=itemsize)
                centered = builder.fsub(value, coefficients[0][v])
                # ``contract`` lets LLVM fuse the multiply and add into one fma, as the Numba
                # loops' fastmath={"contract"} does.
                scaled = builder.fmul(centered, coefficients[1][v], flags=("contract",))
                result = builder.fadd(scaled, coefficients[2][v], flags=("contract",))
                destination = builder.bitcast(builder.gep(target.data, [index]), vector_pointer)
                builder.store(result, destination, align=itemsize)
            row.add_incoming(builder.add(row, ir.Constant(intp, 1)), body)
            builder.branch(row.parent)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _apply_channels(typingctx, x, out, start, num_channels, spatial, coefficients):
    if not (_float_input_and_output(x, out) and _table_like(coefficients, x)):
        return None
    signature = types.void(x, out, types.intp, types.intp, types.intp, coefficients)
    in_place = isinstance(out, types.NoneType)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        target = x_array if in_place else context.make_array(sig.args[1])(context, builder, args[1])
        table = context.make_array(sig.args[5])(context, builder, args[5])
        first, num_channels, spatial = args[2], args[3], args[4]
        _, itemsize, lanes, vector_type, vector_pointer, intp = _host_vectors(
            context, sig.args[0].dtype
        )
        function = builder.function
        entry = builder.block
        channel_header = function.append_basic_block("channels.header")
        channel_body = function.append_basic_block("channels.body")
        last_vector = function.append_basic_block("channels.last_vector")
        done = function.append_basic_block("channels.done")
        lane_count = ir.Constant(intp, lanes)
        last_offset = builder.sub(spatial, lane_count)

        def at(array, index):
            return _vector_at(builder, array, index, vector_pointer)

        def normalized(value, center, scale, shift):
            centered = builder.fsub(value, center)
            scaled = builder.fmul(centered, scale, flags=("contract",))
            return builder.fadd(scaled, shift, flags=("contract",))

        # In place the last channel first, out of place the first (see the module notes):
        # ``remaining`` counts down from num_channels either way.
        builder.branch(channel_header)
        builder.position_at_end(channel_header)
        remaining = builder.phi(intp)
        remaining.add_incoming(num_channels, entry)
        builder.cbranch(
            builder.icmp_signed(">", remaining, ir.Constant(intp, 0)), channel_body, done
        )
        builder.position_at_end(channel_body)
        next_remaining = builder.sub(remaining, ir.Constant(intp, 1))
        channel = next_remaining if in_place else builder.sub(num_channels, remaining)
        channel_start = builder.add(first, builder.mul(channel, spatial))
        center, scale, shift = (
            _broadcast(builder, table, column, channel, vector_type, intp) for column in range(3)
        )
        # The last vector is read before any store: in place, where it overlaps the one before
        # it, it must see the input, not the output.
        last_index = builder.add(channel_start, last_offset)
        last_value = builder.load(at(x_array, last_index), align=itemsize)
        offset, vector_body = _loop_from_zero(builder, "channels.vector", last_offset, last_vector,
                                              intp)  # fmt: skip
        index = builder.add(channel_start, offset)
        value = builder.load(at(x_array, index), align=itemsize)
        builder.store(normalized(value, center, scale, shift), at(target, index), align=itemsize)
        offset.add_incoming(builder.add(offset, lane_count), vector_body)
        builder.branch(offset.parent)
        builder.position_at_end(last_vector)
        result = normalized(last_value, center, scale, shift)
        builder.store(result, at(target, last_index), align=itemsize)
        remaining.add_incoming(next_remaining, last_vector)
        builder.branch(channel_header)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


#: The x86 instructions that permute a vector of values by a vector of lane numbers
#: (``vpermps``/``vpermpd``), by (vector bytes, itemsize): ``(lanes, LLVM intrinsic)``, a whole
#: vector's first, then half of one where there is an instruction for it (none for 4 float64 lanes
#: on ymm, which needs AVX-512VL, nor for 16-byte vectors).
_PERMUTES = {
    (64, 4): ((16, "llvm.x86.avx512.permvar.sf.512"), (8, "llvm.x86.avx2.permps")),
    (64, 8): ((8, "llvm.x86.avx512.permvar.df.512"),),
    (32, 4): ((8, "llvm.x86.avx2.permps"),),
}


def host_window_widths(itemsize: int) -> tuple[int, int]:
    """``(wide, narrow)``: channels per window of ``apply_channel_windows`` for values of
    ``itemsize`` bytes on this host, a whole vector's and half a vector's (0 where the host has
    no permute for them)."""
    lanes = [count for count, _ in _PERMUTES.get((_host_row_limits()[0], itemsize), ())]
    wide, narrow = [*lanes, 0, 0][:2]
    return wide, narrow


@functools.cache
def _channel_windows_kernel(lanes):
    """The LLVM IR loop of ``apply_channel_windows`` for windows of ``lanes`` channels (an
    intrinsic a width)."""

    @intrinsic
    def kernel(typingctx, x, out, start, num_windows, spatial, center, residual, rstd, weight,
               bias, first_channel, lane_channels):  # fmt: skip
        return _channel_windows(lanes, x, out, weight, bias, lane_channels)

    return kernel


def _channel_windows(lanes, x, out, weight, bias, lane_channels):
    """``(signature, codegen)`` of ``_channel_windows_kernel(lanes)``, or None where the types or
    the host do not fit."""
    if not _float_input_and_output(x, out):
        return None
    if any(not isinstance(a, types.Array) or a.dtype != x.dtype for a in (weight, bias)):
        return None
    if not isinstance(lane_channels, types.Array) or lane_channels.dtype != types.int32:
        return None
    if lanes not in host_window_widths(x.dtype.bitwidth // 8):
        return None
    signature = types.void(x, out, types.intp, types.intp, types.intp, x.dtype, types.float64,
                           types.float64, weight, bias, types.intp, lane_channels)  # fmt: skip
    in_place = isinstance(out, types.NoneType)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        target = x_array if in_place else context.make_array(sig.args[1])(context, builder, args[1])
        weight_array, bias_array, table = (
            context.make_array(sig.args[k])(context, builder, args[k]) for k in (8, 9, 11)
        )
        first, num_windows, spatial, center, residual, rstd = args[2:8]
        first_channel = args[10]
        element = context.get_data_type(sig.args[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        name = dict(_PERMUTES[_host_row_limits()[0], itemsize])[lanes]
        intp = context.get_value_type(types.intp)
        int32 = ir.IntType(32)
        double = ir.DoubleType()
        vector_type = ir.VectorType(element, lanes)
        vector_pointer = vector_type.as_pointer()
        wide_type = ir.VectorType(double, lanes)
        table_type = ir.VectorType(int32, lanes)
        index_type = ir.VectorType(ir.IntType(8 * itemsize), lanes)
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector_type, [vector_type, index_type]), name
        )
        centers = _splat(builder, center, vector_type, int32)
        scale_factor = _splat(builder, rstd, wide_type, int32)
        shift_factor = _splat(builder, residual, wide_type, int32)
        window_length = builder.mul(ir.Constant(intp, lanes), spatial)

        def window_body(counter, _):
            # In place the last window first, out of place the first (see the module notes).
            window = counter
            if in_place:
                window = builder.sub(builder.sub(num_windows, ir.Constant(intp, 1)), counter)
            channel = builder.add(first_channel, builder.mul(window, ir.Constant(intp, lanes)))
            # moments.fold_channel for the window's channels, in float64 as there (no fma).
            weights = _load_as(builder, weight_array, channel, lanes, element, wide_type, intp)
            biases = _load_as(builder, bias_array, channel, lanes, element, wide_type, intp)
            wide_scale = builder.fmul(scale_factor, weights)
            wide_shift = builder.fsub(biases, builder.fmul(shift_factor, wide_scale))
            scale = _converted(builder, wide_scale, double, vector_type)
            shift = _converted(builder, wide_shift, double, vector_type)
            window_start = builder.add(first, builder.mul(window, window_length))

            def vector_body(step, _):
                offset = builder.mul(step, ir.Constant(intp, lanes))
                index = builder.add(window_start, offset)
                pointer = builder.bitcast(builder.gep(table.data, [offset]),
                                          table_type.as_pointer())  # fmt: skip
                channels = builder.load(pointer, align=4)
                if index_type != table_type:
                    channels = builder.sext(channels, index_type)
                value = builder.load(_vector_at(builder, x_array, index, vector_pointer),
                                     align=itemsize)  # fmt: skip
                centered = builder.fsub(value, centers)
                scaled = builder.fmul(centered, builder.call(permute, [scale, channels]),
                                      flags=("contract",))  # fmt: skip
                result = builder.fadd(scaled, builder.call(permute, [shift, channels]),
                                      flags=("contract",))  # fmt: skip
                builder.store(result, _vector_at(builder, target, index, vector_pointer),
                              align=itemsize)  # fmt: skip
                return []

            _counted_loop(builder, "windows.vectors", spatial, [], vector_body, intp)
            return []

        _counted_loop(builder, "windows", num_windows, [], window_body, intp)
        return context.get_dummy_value()

    return signature, codegen


def window_widths(x):
    """``host_window_widths`` for ``x``'s dtype, constants of the compiled code."""


@overload(window_widths, inline="always")
def _window_widths(x):
    widths = host_window_widths(x.dtype.bitwidth // 8)
    return lambda x: widths


@numba.njit(inline="always")
def window_table(spatial, lanes):
    """The lane channels of ``apply_channel_windows``: ``table[j * lanes + i] = (j * lanes + i) //
    spatial``, the channel (within a window of ``lanes`` channels) of lane ``i`` of a window's
    ``j``-th vector; int32, 64-byte aligned (one vector load a vector of ``x``)."""
    size = spatial * lanes
    table = aligned_full(size, np.int32(0))
    channel = 0
    position = 0
    for k in range(size):  # k // spatial, without a division a value
        if position == spatial:
            channel += 1
            position = 0
        table[k] = channel
        position += 1
    return table


def apply_channel_windows(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd, weight,
                          bias, first_channel, table, lanes):  # fmt: skip
    """Normalize ``num_channels`` runs of ``spatial`` values from flat ``x[start]`` (a group's
    channels, ``first_channel`` indexing ``weight`` and ``bias``), ``lanes`` channels at a time
    (one of ``window_widths(x)``; ``out=None``: in place), with ``moments.fold_channel``'s
    coefficients.

    A window of ``lanes`` channels is ``spatial`` whole vectors, however long a channel is. Each
    vector takes its lanes' scales and shifts from two registers holding the window's, permuted
    by a vector of lane channels (``table``, from ``window_table``): one load of ``x`` and one of
    the table a vector, where per-value patterns of weight and bias load two more (and the
    channel's own loops of a few dozen values pay their setup and tail). ``num_channels`` is
    whole windows; ``table`` is ``window_table(spatial, lanes)``. A width the host has no permute
    for raises.
    """


@overload(apply_channel_windows, inline="always")
def _apply_channel_windows_checked(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd,
                                   weight, bias, first_channel, table, lanes):  # fmt: skip
    wide, narrow = host_window_widths(x.dtype.bitwidth // 8)
    if not wide:

        def refuse(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd, weight, bias,
                   first_channel, table, lanes):  # fmt: skip
            raise ValueError("apply_channel_windows: this host has no permutes for this dtype")

        return refuse
    wide_kernel = _channel_windows_kernel(wide)
    # Without a narrow width, lanes == narrow == 0 is refused below: the wide kernel stands in.
    narrow_kernel = _channel_windows_kernel(narrow or wide)

    def apply(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd, weight, bias,
              first_channel, table, lanes):  # fmt: skip
        if (
            lanes <= 0
            or (lanes != wide and lanes != narrow)
            or num_channels % lanes
            or spatial < 1
            or table.size < spatial * lanes
            or start < 0
            or start + num_channels * spatial > x.size
            or not _fits_output(x, out)
            or first_channel < 0
            or first_channel + num_channels > min(weight.size, bias.size)
        ):
            raise ValueError("apply_channel_windows: not whole windows, or out of bounds")
        center, residual = rounded_mean(mean_hi, mean_lo, x)
        if lanes == wide:
            wide_kernel(x, out, start, num_channels // lanes, spatial, center, residual, rstd,
                        weight, bias, first_channel, table)  # fmt: skip
        else:
            narrow_kernel(x, out, start, num_channels // lanes, spatial, center, residual, rstd,
                          weight, bias, first_channel, table)  # fmt: skip

    return apply


#: Vectors per group that ``apply_group_rows`` takes (one code path each): groups of up to 128
#: float32 or 64 float64 values with AVX-512.
MAX_GROUP_VECTORS = 8


@intrinsic
def _apply_group_rows(typingctx, x, out, start, rows, group_vectors, groups, own_lanes, centers,
                      scale, shift):  # fmt: skip
    if not _float_input_and_output(x, out):
        return None
    floats = (types.float32, types.float64)
    if any(
        not isinstance(a, types.Array) or a.dtype not in floats for a in (centers, scale, shift)
    ):
        return None
    counts = (types.intp,) * 5
    signature = types.void(x, out, *counts, centers, scale, shift)
    in_place = isinstance(out, types.NoneType)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        target = x_array if in_place else context.make_array(sig.args[1])(context, builder, args[1])
        first, num_rows, num_vectors, num_groups, own_lanes = args[2:7]
        center_array, scale_array, shift_array = (
            context.make_array(sig.args[k])(context, builder, args[k]) for k in (7, 8, 9)
        )
        _, itemsize, lanes, vector_type, vector_pointer, intp = _host_vectors(
            context, sig.args[0].dtype
        )
        # The lane arrays may hold float64 (sums of float32 input in float64; values already
        # rounded to float32, so the conversion is exact).
        center_type, scale_type, shift_type = (
            context.get_data_type(sig.args[k].dtype) for k in (7, 8, 9)
        )
        int32 = ir.IntType(32)
        # Lanes of a group's last vector that still belong to it (the rest: the next group's).
        lane_numbers = ir.Constant(ir.VectorType(intp, lanes), list(range(lanes)))
        own = builder.icmp_signed(
            "<", lane_numbers, _splat(builder, own_lanes, ir.VectorType(intp, lanes), int32)
        )
        one = ir.Constant(intp, 1)

        def center_of(group):
            scalar = builder.load(builder.gep(center_array.data, [group]))
            splat = _splat(builder, scalar, ir.VectorType(center_type, lanes), int32)
            return _converted(builder, splat, center_type, vector_type)

        def at(array, index):
            return _vector_at(builder, array, index, vector_pointer)

        function = builder.function
        done = function.append_basic_block("group_rows.done")
        switch = builder.switch(num_vectors, done)
        for count in range(1, MAX_GROUP_VECTORS + 1):
            case = function.append_basic_block(f"group_rows.{count}")
            switch.add_case(ir.Constant(intp, count), case)
            builder.position_at_end(case)
            group_length = ir.Constant(intp, count * lanes)
            row_length = builder.mul(num_groups, group_length)

            def row_body(row, _, count=count, group_length=group_length, row_length=row_length):
                row_start = builder.add(first, builder.mul(row, row_length))

                def group_body(group, _):
                    following = builder.add(group, one)
                    wrapped = builder.select(
                        builder.icmp_signed("<", following, num_groups),
                        following,
                        ir.Constant(intp, 0),
                    )
                    center = center_of(group)
                    last_center = builder.select(own, center, center_of(wrapped))
                    group_start = builder.mul(group, group_length)
                    for v in range(count):
                        lane = builder.add(group_start, ir.Constant(intp, v * lanes))
                        index = builder.add(row_start, lane)
                        value = builder.load(at(x_array, index), align=itemsize)
                        centered = builder.fsub(value, center if v < count - 1 else last_center)
                        factor = _load_as(builder, scale_array, lane, lanes, scale_type,
                                          vector_type, intp)  # fmt: skip
                        offset = _load_as(builder, shift_array, lane, lanes, shift_type,
                                          vector_type, intp)  # fmt: skip
                        scaled = builder.fmul(centered, factor, flags=("contract",))
                        result = builder.fadd(scaled, offset, flags=("contract",))
                        builder.store(result, at(target, index), align=itemsize)
                    return []

                _counted_loop(builder, f"group_rows.{count}.groups", num_groups, [], group_body,
                              intp)  # fmt: skip
                return []

            _counted_loop(builder, f"group_rows.{count}.rows", num_rows, [], row_body, intp)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


def _splat(builder, scalar, vector_type, int32):
    """``scalar`` in every lane of a ``vector_type``."""
    single = builder.insert_element(
        ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(int32, 0)
    )
    zeros = ir.Constant(ir.VectorType(int32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(single, single, zeros)


#: Rows the in-register lane sums add up before adding them to the lane sums in memory: each lane
#: then adds sums of at most this many values, as the four-row sweeps add sums of four.
SPILL_ROWS = 32


def _sum_row_vectors() -> int:
    """The longest row, in vectors, whose lane sums ``lane_sums_in_registers`` keeps in registers:
    a quarter of the vector registers (32 where rows of 512 bytes fit, see the module notes, else
    16), so that two sums' accumulators and the pivots take three quarters of them. Shorter rows
    get more sets of accumulators (each row of a set added in turn): rows of one or two vectors do
    not then wait for the latency of an addition per row."""
    return 8 if _host_row_limits()[1] >= 512 else 4


@intrinsic
def _sum_rows_in_registers(typingctx, x, start, rows, row_vectors, lanes):
    if not (_float_input_and_output(x, types.none) and _table_like(lanes, x)):
        return None
    signature = types.void(x, types.intp, types.intp, types.intp, lanes)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        lane_array = context.make_array(sig.args[4])(context, builder, args[4])
        first, num_rows, num_vectors = args[1], args[2], args[3]
        element = context.get_data_type(sig.args[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        vector_bytes = _host_row_limits()[0]
        row_limit = _sum_row_vectors()
        lanes = vector_bytes // itemsize
        vector_type = ir.VectorType(element, lanes)
        vector_pointer = vector_type.as_pointer()
        zero = ir.Constant(vector_type, [0.0] * lanes)
        intp = context.get_value_type(types.intp)
        lane_row = cgutils.unpack_tuple(builder, lane_array.shape, 2)[1]
        function = builder.function
        done = function.append_basic_block("sums.done")
        spill = ir.Constant(intp, SPILL_ROWS)
        num_spills = builder.sdiv(builder.add(num_rows, ir.Constant(intp, SPILL_ROWS - 1)), spill)

        def lane_pointer(row, offset):
            index = builder.add(builder.mul(ir.Constant(intp, row), lane_row), offset)
            return builder.bitcast(builder.gep(lane_array.data, [index]), vector_pointer)

        def counted_loop(name, stop, carried, body):
            return _counted_loop(builder, name, stop, carried, body, intp)

        def sum_rows(count):
            """The rows of ``count`` vectors: the sums, spilled every ``SPILL_ROWS`` rows."""
            sets = row_limit // count
            width = ir.Constant(intp, count * lanes)
            pivots = [
                builder.load(lane_pointer(0, ir.Constant(intp, v * lanes)), align=itemsize)
                for v in range(count)
            ]

            def add_row(row, s1, s2):
                """``s1, s2`` (a vector per lane vector) plus row ``row``'s deviations."""
                row_start = builder.add(first, builder.mul(row, width))
                new_s1, new_s2 = [], []
                for v in range(count):
                    index = builder.add(row_start, ir.Constant(intp, v * lanes))
                    source = builder.bitcast(builder.gep(x_array.data, [index]), vector_pointer)
                    d = builder.fsub(builder.load(source, align=itemsize), pivots[v])
                    new_s1.append(builder.fadd(s1[v], d))
                    square = builder.fmul(d, d, flags=("contract",))
                    new_s2.append(builder.fadd(s2[v], square, flags=("contract",)))
                return new_s1, new_s2

            def spill_body(spill_index, _):
                spill_start = builder.mul(spill_index, spill)
                spill_rows = builder.sub(num_rows, spill_start)
                is_short = builder.icmp_signed("<", spill_rows, spill)
                spill_rows = builder.select(is_short, spill_rows, spill)
                per_set = ir.Constant(intp, sets)

                def sets_body(step, carried):
                    values = list(carried)
                    for k in range(sets):
                        row = builder.add(spill_start,
                                          builder.add(builder.mul(step, per_set),
                                                      ir.Constant(intp, k)))  # fmt: skip
                        base = 2 * count * k
                        s1, s2 = add_row(row, values[base : base + count],
                                         values[base + count : base + 2 * count])  # fmt: skip
                        values[base : base + 2 * count] = s1 + s2
                    return values

                steps = builder.sdiv(spill_rows, per_set)
                accumulated = counted_loop(f"sums.{count}.sets", steps,
                                           [zero] * (2 * count * sets), sets_body)  # fmt: skip
                # The rows a whole step of the sets leaves, into the first set.
                done_rows = builder.mul(steps, per_set)

                def rest_body(step, carried):
                    row = builder.add(spill_start, builder.add(done_rows, step))
                    s1, s2 = add_row(row, carried[:count], carried[count:])
                    return s1 + s2

                first_set = counted_loop(f"sums.{count}.rest",
                                         builder.sub(spill_rows, done_rows),
                                         accumulated[: 2 * count], rest_body)  # fmt: skip
                totals = list(first_set)
                for k in range(1, sets):
                    base = 2 * count * k
                    for j in range(2 * count):
                        totals[j] = builder.fadd(totals[j], accumulated[base + j])
                for v in range(count):
                    for row, total in ((1, totals[v]), (2, totals[count + v])):
                        pointer = lane_pointer(row, ir.Constant(intp, v * lanes))
                        previous = builder.load(pointer, align=itemsize)
                        builder.store(builder.fadd(previous, total), pointer, align=itemsize)
                return []

            counted_loop(f"sums.{count}.spill", num_spills, [], spill_body)
            builder.branch(done)

        switch = builder.switch(num_vectors, done)
        for count in range(1, row_limit + 1):
            case = function.append_basic_block(f"sums.{count}")
            switch.add_case(ir.Constant(intp, count), case)
            builder.position_at_end(case)
            sum_rows(count)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


def lane_sums_in_registers(x, start, rows, row_vectors, lanes):
    """Add ``x - lanes[0]`` and its square per lane to ``lanes[1]`` and ``lanes[2]`` over ``rows``
    consecutive rows of ``row_vectors`` vectors (at most ``_sum_row_vectors()``) from flat
    ``x[start]``, the sums held in registers and added to ``lanes`` every ``SPILL_ROWS`` rows:
    without the loads and stores of the lane sums every few rows that the four-row sweeps of
    ``nhwc.lane_sums`` pay (a 512 KiB float32 sample in L2, C = 16 to 128, one thread: 2.3-2.5 us
    against 3.8-4.2; a plain sum, 2.1).

    ``lanes`` is C-contiguous, of x's dtype (see ``registers_hold_rows``).
    """


@overload(lane_sums_in_registers, inline="always")
def _lane_sums_in_registers(x, start, rows, row_vectors, lanes):
    if lanes.dtype != x.dtype:  # float64 sums of float32 values: registers_hold_rows said no

        def refuse(x, start, rows, row_vectors, lanes):
            raise ValueError("lane_sums_in_registers: lanes of another dtype than x")

        return refuse

    row_limit = _sum_row_vectors()

    def sum_rows(x, start, rows, row_vectors, lanes):
        if not 1 <= row_vectors <= row_limit:
            raise ValueError("lane_sums_in_registers: row_vectors out of range")
        _sum_rows_in_registers(x, start, rows, row_vectors, lanes)

    return sum_rows


def registers_hold_rows(x, lanes, width):
    """Whether ``lane_sums_in_registers`` takes rows of ``width`` values of ``x`` into ``lanes``:
    whole vectors, at most ``_sum_row_vectors()`` of them, and lanes of x's dtype (native sums)."""


@overload(registers_hold_rows, inline="always")
def _registers_hold_rows(x, lanes, width):
    if lanes.dtype != x.dtype:
        return lambda x, lanes, width: False
    max_bytes = _sum_row_vectors() * _host_row_limits()[0]
    return lambda x, lanes, width: (
        width % channel_lanes(x) == 0 and 0 < width * x.itemsize <= max_bytes
    )


#: The vectors of a group that ``folded_lane_sums`` adds into one vector of lane sums per row:
#: 1, 2 or 4 (with four rows a sweep, each lane then adds sums of at most 16 values). Each count
#: is a loop of its own, unrolled, and Numba optimizes that code again in every function it is
#: linked into: with counts up to 8, a first channels-last call compiled 7 s longer.
FOLDS = (1, 2, 4)


@intrinsic
def _sum_folded_rows(typingctx, x, start, stream_stride, rows, width, fold, lanes):
    if not (_float_input_and_output(x, types.none) and _table_like(lanes, x)):
        return None
    signature = types.void(x, types.intp, types.intp, types.intp, types.intp, types.intp, lanes)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        lane_array = context.make_array(sig.args[6])(context, builder, args[6])
        first, stride, num_rows, row_width, num_folded = args[1:6]
        _, itemsize, lanes, _, vector_pointer, intp = _host_vectors(context, sig.args[0].dtype)
        lane_row = cgutils.unpack_tuple(builder, lane_array.shape, 2)[1]
        function = builder.function
        done = function.append_basic_block("folded.done")

        def lane_pointer(row, offset):
            index = builder.add(builder.mul(ir.Constant(intp, row), lane_row), offset)
            return builder.bitcast(builder.gep(lane_array.data, [index]), vector_pointer)

        def total(values):
            """The sum of ``values`` as a balanced tree, as the sweeps add their four rows."""
            while len(values) > 1:
                pairs = [
                    builder.fadd(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)
                ]
                values = pairs + values[len(pairs) * 2 :]
            return values[0]

        def sum_rows(count, streams):
            """Rows (``streams`` of them a step) whose lane vectors each fold ``count`` vectors."""
            lane_vectors = builder.sdiv(row_width, ir.Constant(intp, count * lanes))
            exit_rows = function.append_basic_block(f"folded.{count}.{streams}.rows.exit")
            row, _ = _loop_from_zero(builder, f"folded.{count}.{streams}.rows", num_rows,
                                   exit_rows, intp)  # fmt: skip
            row_start = builder.add(first, builder.mul(row, row_width))
            exit_lanes = function.append_basic_block(f"folded.{count}.{streams}.lanes.exit")
            lane, _ = _loop_from_zero(builder, f"folded.{count}.{streams}.lanes", lane_vectors,
                                      exit_lanes, intp)  # fmt: skip
            lane_offset = builder.mul(lane, ir.Constant(intp, lanes))
            pivot = builder.load(lane_pointer(0, lane_offset), align=itemsize)
            vectors_start = builder.add(
                row_start, builder.mul(lane_offset, ir.Constant(intp, count))
            )
            # One chain of sums per stream, each starting from its first deviation: the streams'
            # chains are independent, so their additions overlap.
            s1, s2 = [None] * streams, [None] * streams
            for v in range(count):
                for k in range(streams):
                    index = builder.add(vectors_start, ir.Constant(intp, v * lanes))
                    if k:
                        index = builder.add(index, builder.mul(stride, ir.Constant(intp, k)))
                    source = builder.bitcast(builder.gep(x_array.data, [index]), vector_pointer)
                    d = builder.fsub(builder.load(source, align=itemsize), pivot)
                    square = builder.fmul(d, d, flags=("contract",))
                    if v == 0:
                        s1[k], s2[k] = d, square
                    else:
                        s1[k] = builder.fadd(s1[k], d)
                        s2[k] = builder.fadd(s2[k], square, flags=("contract",))
            for row_index, value in ((1, total(s1)), (2, total(s2))):
                pointer = lane_pointer(row_index, lane_offset)
                previous = builder.load(pointer, align=itemsize)
                builder.store(builder.fadd(previous, value), pointer, align=itemsize)
            lane.add_incoming(builder.add(lane, ir.Constant(intp, 1)), builder.block)
            builder.branch(lane.parent)
            builder.position_at_end(exit_lanes)
            row.add_incoming(builder.add(row, ir.Constant(intp, 1)), builder.block)
            builder.branch(row.parent)
            builder.position_at_end(exit_rows)
            builder.branch(done)

        swept = builder.icmp_signed(">", stride, ir.Constant(intp, 0))
        switch = builder.switch(num_folded, done)
        for count in FOLDS:
            case = function.append_basic_block(f"folded.{count}")
            switch.add_case(ir.Constant(intp, count), case)
            builder.position_at_end(case)
            sweeps = function.append_basic_block(f"folded.{count}.sweeps")
            single = function.append_basic_block(f"folded.{count}.single")
            builder.cbranch(swept, sweeps, single)
            builder.position_at_end(sweeps)
            sum_rows(count, 4)
            builder.position_at_end(single)
            sum_rows(count, 1)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return signature, codegen


def folded_lane_sums(x, start, stream_stride, rows, width, fold, lanes):
    """Add ``x - lanes[0]`` and its square to ``lanes[1]`` and ``lanes[2]`` over ``rows`` rows of
    ``width`` values from flat ``x[start]``, ``fold`` consecutive vectors of a row into each vector
    of lanes (lane ``j`` of ``lanes`` sums values ``j % V + V * (fold * (j // V) + k)``, ``k <
    fold``, of a row of ``V``-value vectors); with a positive ``stream_stride``, each row together
    with the rows ``stream_stride``, 2 and 3 times ``stream_stride`` further, as ``nhwc.lane_sums``'
    sweeps.

    For rows too long for their lane sums to stay in L1 beside the rows (channels last, C = 2048:
    24 KiB of pivots and sums): the vectors of a group fold into a few lanes, whose sums are then
    a few KiB. A 401 KB float32 sample in L2, C = 2048, 32 groups, one thread: 2.3 against 4.1 us
    for the sweeps; a plain sum, 1.7-2.0.

    ``lanes`` is C-contiguous, of x's dtype, ``width / fold`` lanes a row; ``fold`` (one of
    ``FOLDS``) vectors never span two groups (see ``lane_fold``).
    """


@overload(folded_lane_sums, inline="always")
def _folded_lane_sums(x, start, stream_stride, rows, width, fold, lanes):
    if lanes.dtype != x.dtype:  # float64 sums of float32 values: lane_fold said 0

        def refuse(x, start, stream_stride, rows, width, fold, lanes):
            raise ValueError("folded_lane_sums: lanes of another dtype than x")

        return refuse

    def sum_folded(x, start, stream_stride, rows, width, fold, lanes):
        streams = 4 if stream_stride > 0 else 1
        last = start + (streams - 1) * stream_stride + rows * width  # one past the last value
        if (
            fold not in FOLDS
            or width % (fold * channel_lanes(x))
            or start < 0
            or rows < 0
            or (rows > 0 and last > x.size)
            or lanes.shape[0] < 3
            or lanes.shape[1] * fold < width
        ):
            raise ValueError("folded_lane_sums: fold, rows or lanes out of range")
        _sum_folded_rows(x, start, stream_stride, rows, width, fold, lanes)

    return sum_folded


def lane_fold(x, lanes, channels_per_group):
    """Vectors of ``x`` that ``folded_lane_sums`` folds into one vector of lanes for groups of
    ``channels_per_group`` channels: the largest of ``FOLDS`` that divides a group's vectors; 0
    where a group is not whole vectors or ``lanes`` are not of x's dtype (native sums)."""


@overload(lane_fold, inline="always")
def _lane_fold(x, lanes, channels_per_group):
    if lanes.dtype != x.dtype:
        return lambda x, lanes, channels_per_group: 0

    def fold(x, lanes, channels_per_group):
        vector = channel_lanes(x)
        if channels_per_group % vector:
            return 0
        group_vectors = channels_per_group // vector
        for count in FOLDS[::-1]:
            if group_vectors % count == 0:
                return count
        return 0

    return fold


@intrinsic
def _float64_run_sums(typingctx, values, start, run, runs, totals, column):
    if not (
        _float_input_and_output(values, types.none)
        and isinstance(totals, types.Array)
        and totals.dtype == types.float64
        and totals.ndim == 2
        and totals.layout == "C"
    ):
        return None
    signature = types.void(values, types.intp, types.intp, types.intp, totals, types.intp)

    def codegen(context, builder, sig, args):
        value_array = context.make_array(sig.args[0])(context, builder, args[0])
        total_array = context.make_array(sig.args[4])(context, builder, args[4])
        first, run_length, num_runs, column = args[1], args[2], args[3], args[5]
        element, itemsize, lanes, _, vector_pointer, intp = _host_vectors(
            context, sig.args[0].dtype
        )
        double = ir.DoubleType()
        wide_type = ir.VectorType(double, lanes)
        total_row = cgutils.unpack_tuple(builder, total_array.shape, 2)[1]
        reduce = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(double, [double, wide_type]),
            f"llvm.vector.reduce.fadd.v{lanes}f64",
        )

        def run_body(index, _):
            run_start = builder.add(first, builder.mul(index, run_length))

            def vector_body(step, carried):
                offset = builder.add(run_start, builder.mul(step, ir.Constant(intp, lanes)))
                source = builder.bitcast(builder.gep(value_array.data, [offset]), vector_pointer)
                value = builder.load(source, align=itemsize)
                if element != double:
                    value = builder.fpext(value, wide_type)
                return [builder.fadd(carried[0], value)]

            vectors = builder.sdiv(run_length, ir.Constant(intp, lanes))
            zero = ir.Constant(wide_type, [0.0] * lanes)
            (accumulated,) = _counted_loop(builder, "runs.vectors", vectors, [zero], vector_body,
                                           intp)  # fmt: skip
            # reassoc: the lanes add up as a tree, not one after the other.
            total = builder.call(reduce, [ir.Constant(double, 0.0), accumulated],
                                 fastmath=("reassoc",))  # fmt: skip
            target = builder.add(builder.mul(index, total_row), column)
            builder.store(total, builder.gep(total_array.data, [target]))
            return []

        _counted_loop(builder, "runs", num_runs, [], run_body, intp)
        return context.get_dummy_value()

    return signature, codegen


def float64_run_sums(values, start, run, runs, totals, column):
    """``totals[i, column] = sum(values[start + i * run : start + (i + 1) * run])`` for ``i <
    runs``, in float64, in any order: vectors converted to float64 and added, then their lanes
    as a tree. For runs of a few vectors, where a Numba loop (``nhwc.float64_sum``) runs its
    scalar remainder, one call a run (C = 2048, 32 groups: a group's 16 folded lanes, or its 64
    values at a position). ``run`` is whole vectors (``channel_lanes(values)``); ``totals`` is a
    C-contiguous float64 table."""


@overload(float64_run_sums, inline="always")
def _float64_run_sums_checked(values, start, run, runs, totals, column):
    def sum_runs(values, start, run, runs, totals, column):
        if (
            run % channel_lanes(values)
            or start < 0
            or runs > totals.shape[0]
            or start + run * runs > values.size
            or not 0 <= column < totals.shape[1]
        ):
            raise ValueError("float64_run_sums: runs out of bounds or not whole vectors")
        _float64_run_sums(values, start, run, runs, totals, column)

    return sum_runs


def _loop_from_zero(builder, name, stop, exit_block, intp):
    """Open a loop at the builder's position: ``(counter, body)``, the counter counting from 0 and
    the body (where the builder is left) running while it is below ``stop``, else ``exit_block``.
    The caller ends the body with ``counter.add_incoming(next value, its last block)`` and a branch
    to ``counter``'s block."""
    function = builder.function
    entry = builder.block
    header = function.append_basic_block(f"{name}.header")
    body = function.append_basic_block(f"{name}.body")
    builder.branch(header)
    builder.position_at_end(header)
    counter = builder.phi(intp)
    counter.add_incoming(ir.Constant(intp, 0), entry)
    builder.cbranch(builder.icmp_signed("<", counter, stop), body, exit_block)
    builder.position_at_end(body)
    return counter, body


def _host_vectors(context, dtype):
    """``(element, itemsize, lanes, vector_type, vector_pointer, intp)`` for the host's widest
    vectors of the Numba ``dtype`` (see ``row_limits``), as the intrinsics' code uses them."""
    element = context.get_data_type(dtype)
    itemsize = context.get_abi_sizeof(element)
    lanes = _host_row_limits()[0] // itemsize
    vector_type = ir.VectorType(element, lanes)
    return (
        element,
        itemsize,
        lanes,
        vector_type,
        vector_type.as_pointer(),
        context.get_value_type(types.intp),
    )


def _counted_loop(builder, name, stop, carried, body, intp):
    """A loop of ``stop`` iterations at the builder's position, carrying the values ``carried``;
    ``body(counter, values)`` returns their next values. Returns their values after the loop."""
    entry = builder.block
    exit_block = builder.function.append_basic_block(f"{name}.exit")
    counter, body_block = _loop_from_zero(builder, name, stop, exit_block, intp)
    builder.position_at_start(counter.parent)
    phis = [builder.phi(value.type) for value in carried]
    for phi, value in zip(phis, carried, strict=True):
        phi.add_incoming(value, entry)
    builder.position_at_end(body_block)
    following = body(counter, phis)
    latch = builder.block
    counter.add_incoming(builder.add(counter, ir.Constant(intp, 1)), latch)
    for phi, value in zip(phis, following, strict=True):
        phi.add_incoming(value, latch)
    builder.branch(counter.parent)
    builder.position_at_end(exit_block)
    return phis


def _broadcast(builder, table, row, column, vector_type, intp):
    """``table[row, column]`` (a C-contiguous 2-D array) in every lane of a vector."""
    row_length = cgutils.unpack_tuple(builder, table.shape, 2)[1]
    index = builder.add(builder.mul(ir.Constant(intp, row), row_length), column)
    scalar = builder.load(builder.gep(table.data, [index]))
    return _splat(builder, scalar, vector_type, ir.IntType(32))


def _vector_at(builder, array, index, vector_pointer):
    """A pointer to the vector of ``array`` that starts at element ``index`` (an LLVM value)."""
    return builder.bitcast(builder.gep(array.data, [index]), vector_pointer)


def _load_as(builder, array, offset, lanes, lane_type, vector_type, intp):
    """A vector of ``lanes`` values of ``array`` from ``offset`` (an int, or an LLVM value),
    converted to ``vector_type``."""
    if isinstance(offset, int):
        offset = ir.Constant(intp, offset)
    pointer = builder.gep(array.data, [offset])
    loaded_type = ir.VectorType(lane_type, lanes)
    value = builder.load(builder.bitcast(pointer, loaded_type.as_pointer()), align=4)
    return _converted(builder, value, lane_type, vector_type)


def _converted(builder, value, lane_type, vector_type):
    """A vector ``value`` of ``lane_type`` converted to ``vector_type``."""
    if lane_type == vector_type.element:
        return value
    if isinstance(lane_type, ir.DoubleType):
        return builder.fptrunc(value, vector_type)
    return builder.fpext(value, vector_type)


@numba.njit(inline="always")
def apply_rows(x, out, start, rows, row_vectors, center, scale, shift):
    """``out[i] = (x[i] - center[j]) * scale[j] + shift[j]`` for ``rows`` rows of ``row_vectors``
    vectors (``row_limits()[0]`` bytes each) from flat ``x[start]``, ``j`` the index in the row
    (``out=None``: in place).

    ``x``, ``out`` and the lane arrays are contiguous; the lane arrays hold at least a row each, in
    x's dtype or float64 (converted once a call). A row is at most ``row_limits()[1]`` bytes.
    """
    vector_bytes, max_row_bytes = row_limits()
    if not 1 <= row_vectors <= max_row_bytes // vector_bytes:
        raise ValueError("apply_rows: row_vectors out of range")
    _apply_rows(x, out, start, rows, row_vectors, center, scale, shift)


@numba.njit(inline="always")
def channel_lanes(x):
    """Values of ``x``'s dtype in one of the host's vectors: ``apply_channels``' shortest run."""
    return row_limits()[0] // x.itemsize


@numba.njit(inline="always")
def apply_channels(x, out, start, num_channels, spatial, coefficients):
    """``out[i] = (x[i] - center) * scale + shift`` for ``num_channels`` runs of ``spatial`` values
    from flat ``x[start]``, with column ``k`` of ``coefficients`` (``(3, rows)``: centers, scales,
    shifts; x's dtype, C-contiguous) for run ``k``; ``out=None``: in place, the last run first,
    else the first run first (see the module notes).

    A run is at least ``channel_lanes(x)`` values long.
    """
    if spatial < channel_lanes(x) or coefficients.shape[1] < num_channels:
        raise ValueError("apply_channels: runs shorter than a vector, or too few coefficients")
    _apply_channels(x, out, start, num_channels, spatial, coefficients)


def _fits_output(x, out):
    """Whether ``out`` is None (in place) or as large as ``x``."""


@overload(_fits_output, inline="always")
def _fits_output_typed(x, out):
    # Chosen from out's type when Numba compiles: ``out is None or out.size == x.size`` would be
    # typed whole, and None has no size.
    if isinstance(out, types.NoneType):
        return lambda x, out: True
    return lambda x, out: out.size == x.size


@numba.njit(inline="always")
def apply_group_rows(x, out, start, rows, group_vectors, groups, own_lanes, centers, scale,
                     shift):  # fmt: skip
    """``out[i] = (x[i] - center) * scale[j] + shift[j]`` for ``rows`` rows of ``groups`` runs of
    ``group_vectors`` vectors (``channel_lanes(x)`` values each) from flat ``x[start]``, ``j`` the
    index in the row (``out=None``: in place).

    ``center`` is ``centers[k]`` for the ``k``-th run of a row, but in the run's last vector only
    for its first ``own_lanes`` lanes (none to all), the rest taking the next run's (the first
    run's after the last): channels-last rows whose groups are whole vectors, started ``lanes -
    own_lanes`` values into a group (a whole vector in, with none of its own) for alignment. One
    broadcast a group instead of a row of per-lane centers: the lane coefficients of C = 2048
    float32 shrink from 24 to 16 KiB, and stay in a 32 KiB L1 beside a row of ``x``.
    """
    lanes = channel_lanes(x)
    row_length = groups * group_vectors * lanes
    if (
        not 1 <= group_vectors <= MAX_GROUP_VECTORS
        or not 0 <= own_lanes <= lanes
        or start < 0
        or rows < 0
        or start + rows * row_length > x.size
        or not _fits_output(x, out)
        or centers.size < groups
        or scale.size < row_length
        or shift.size < row_length
    ):
        raise ValueError("apply_group_rows: rows out of bounds, or a bad group layout")
    _apply_group_rows(x, out, start, rows, group_vectors, groups, own_lanes, centers, scale, shift)


@intrinsic
def _apply_streamed_vectors(typingctx, x, out, start, count, center, scale, shift):
    # Flat C-contiguous arrays only: the loop indexes their data pointers.
    if not (
        _float_input_and_output(x, out)
        and isinstance(out, types.Array)
        and all(a.ndim == 1 and a.layout == "C" for a in (x, out))
    ):
        return None
    signature = types.void(x, out, types.intp, types.intp, x.dtype, x.dtype, x.dtype)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        out_array = context.make_array(sig.args[1])(context, builder, args[1])
        first, num_vectors = args[2], args[3]
        _, itemsize, lanes, vector_type, vector_pointer, intp = _host_vectors(
            context, sig.args[0].dtype
        )
        center, scale, shift = (_splat(builder, value, vector_type, ir.IntType(32))
                                for value in args[4:7])  # fmt: skip

        def normalized(value, offset):
            # No ``contract``: one rounding per operation, as the Numba loops of the callers
            # (compiled without it) compute the rest of the run.
            return builder.fadd(builder.fmul(builder.fsub(value, center), scale), shift)

        _stream_vectors(builder, "streamed", x_array, out_array, first, num_vectors,
                        normalized, (itemsize, lanes, vector_pointer, intp))  # fmt: skip
        return context.get_dummy_value()

    return signature, codegen


def _stream_vectors(builder, name, x, out, first, count, result_of, vectors):
    """A loop over ``count`` vectors: each loaded from ``x`` at ``first + offset``, turned into
    ``result_of(value, offset)`` (``offset``: values from the first vector, an LLVM value), stored
    at ``first + offset`` of ``out`` with a non-temporal hint (``movntps`` /
    ``movntpd`` on x86; ``out`` aligned to the vectors there). ``vectors`` is ``(itemsize,
    lanes, vector_pointer, intp)`` of ``_host_vectors``."""
    itemsize, lanes, vector_pointer, intp = vectors
    nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])

    def stream_vector(vector, carried):
        offset = builder.mul(vector, ir.Constant(intp, lanes))
        index = builder.add(first, offset)
        value = builder.load(_vector_at(builder, x, index, vector_pointer), align=itemsize)
        target = _vector_at(builder, out, index, vector_pointer)
        store = builder.store(result_of(value, offset), target, align=lanes * itemsize)
        store.set_metadata("nontemporal", nontemporal)
        return carried

    _counted_loop(builder, name, count, [], stream_vector, intp)


@intrinsic
def _apply_streamed_rows(typingctx, x, out, start, rows, row_vectors, center, scale, shift):
    # Flat C-contiguous arrays only, lanes of x's dtype: the loops index their data pointers, and
    # compute in x's dtype as nhwc.apply_positions' loops do with its lanes.
    if not (
        _float_input_and_output(x, out)
        and isinstance(out, types.Array)
        and all(
            isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            for a in (x, out, center, scale, shift)
        )
        and all(a.dtype == x.dtype for a in (center, scale, shift))
    ):
        return None
    signature = types.void(x, out, types.intp, types.intp, types.intp, center, scale, shift)

    def codegen(context, builder, sig, args):
        x_array = context.make_array(sig.args[0])(context, builder, args[0])
        out_array = context.make_array(sig.args[1])(context, builder, args[1])
        first, num_rows, num_vectors = args[2], args[3], args[4]
        lane_arrays = [
            context.make_array(sig.args[k])(context, builder, args[k]) for k in (5, 6, 7)
        ]
        _, itemsize, lanes, _, vector_pointer, intp = _host_vectors(context, sig.args[0].dtype)
        row_length = builder.mul(num_vectors, ir.Constant(intp, lanes))

        def normalized(value, lane):
            center, scale, shift = (
                builder.load(_vector_at(builder, array, lane, vector_pointer), align=itemsize)
                for array in lane_arrays
            )
            # ``contract``: one fma, as apply_positions' loops (fastmath={"contract"}) compute
            # the rows around these.
            scaled = builder.fmul(builder.fsub(value, center), scale, flags=("contract",))
            return builder.fadd(scaled, shift, flags=("contract",))

        def store_row(row, carried):
            row_start = builder.add(first, builder.mul(row, row_length))
            _stream_vectors(builder, "streamed.vectors", x_array, out_array, row_start,
                            num_vectors, normalized, (itemsize, lanes, vector_pointer,
                                                      intp))  # fmt: skip
            return carried

        _counted_loop(builder, "streamed.rows", num_rows, [], store_row, intp)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _store_fence(typingctx):
    def codegen(context, builder, sig, args):
        fence = builder.module.declare_intrinsic(
            "llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), [])
        )
        builder.call(fence, [])
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(inline="always")
def whole_lines(out, start, stop):
    """``(body_start, body_stop)``: the part of ``out[start:stop]`` (aligned to its items) that
    covers whole 64-byte lines, which stream; the ends go through the caches. Whole lines only
    (one vector or more each): a line half streamed and half written through the cache would be
    read for the other half."""
    line = 64 // out.itemsize
    misaligned = (out.ctypes.data // out.itemsize + start) % line
    body_start = min(stop, start + (line - misaligned) % line)
    return body_start, body_start + (stop - body_start) // line * line


@numba.njit(inline="always")
def apply_streamed(x, out, start, stop, center, scale, shift):
    """``out[i] = (x[i] - center) * scale + shift`` for i in ``[start, stop)``, as
    ``moments.apply_reversed`` (chunks from the end), but the 64-byte lines of ``out`` that the
    run covers whole are stored past the caches (non-temporal, aligned vectors); its ends as
    usual.

    ``out`` is a separate array as large as ``x``, aligned to its items (``streams``). Another
    thread may read ``out`` only after this one's ``fence_streams``.
    """
    lanes = channel_lanes(x)
    if start < 0 or stop > x.size or out.size != x.size or out.ctypes.data % out.itemsize != 0:
        raise ValueError("apply_streamed: run out of bounds, or out not aligned to its items")
    body_start, body_stop = whole_lines(out, start, stop)
    apply_contiguous(x, out, body_stop, stop, center, scale, shift)
    chunk_stop = body_stop
    while chunk_stop > body_start:  # APPLY_CHUNK is whole lines: every chunk starts on one
        chunk_start = max(body_start, chunk_stop - APPLY_CHUNK)
        _apply_streamed_vectors(x, out, chunk_start, (chunk_stop - chunk_start) // lanes, center,
                                scale, shift)  # fmt: skip
        chunk_stop = chunk_start
    apply_contiguous(x, out, start, body_start, center, scale, shift)


def apply_streamed_rows(x, out, start, rows, width, center, scale, shift):
    """``out[i] = (x[i] - center[j]) * scale[j] + shift[j]`` for ``rows`` rows of ``width``
    values from flat ``start``, ``j`` the index in the row (as ``apply_rows``), every row stored
    past the caches: its first value on a 64-byte line of ``out``, ``width`` whole lines.

    ``out`` is a separate array as large as ``x``; the lane arrays hold a row each, in x's
    dtype. Another thread may read ``out`` only after this one's ``fence_streams``. Where
    nothing streams (in place, ``out=None``, or on a host without streaming: see
    ``streamed_rows_skew``) it raises ValueError.
    """


@overload(apply_streamed_rows, inline="always")
def _apply_streamed_rows_checked(x, out, start, rows, width, center, scale, shift):
    if _never_streams(out):

        def refuse(x, out, start, rows, width, center, scale, shift):
            raise ValueError("apply_streamed_rows: nothing streams in place or on this host")

        return refuse

    def apply(x, out, start, rows, width, center, scale, shift):
        line = 64 // x.itemsize
        if (
            rows < 0
            or width <= 0
            or width % line != 0
            or start < 0
            or start + rows * width > x.size
            or out.size != x.size
            or (out.ctypes.data + start * out.itemsize) % 64 != 0
            or min(center.size, scale.size, shift.size) < width
        ):
            raise ValueError("apply_streamed_rows: rows out of bounds, not on 64-byte lines of "
                             "out, or lanes shorter than a row")  # fmt: skip
        _apply_streamed_rows(x, out, start, rows, width // channel_lanes(x), center, scale, shift)

    return apply


def streamed_rows_skew(x, out, start, width):
    """Values from flat ``start`` to the first 64-byte line of ``out`` where rows of ``width``
    values are normalized by ``apply_streamed_rows``: where ``streams(x, out)`` and a row is
    whole lines; -1 where they are not (in place, always)."""


@overload(streamed_rows_skew, inline="always")
def _streamed_rows_skew(x, out, start, width):
    if _never_streams(out):
        return lambda x, out, start, width: -1

    def skew(x, out, start, width):
        if not streams(x, out) or width % (64 // x.itemsize) != 0:
            return -1
        return whole_lines(out, start, out.size)[0] - start

    return skew


def apply_run(x, out, start, stop, center, scale, shift):
    """``moments.apply_reversed`` (``out=None``: in place), or ``apply_streamed`` where
    ``streams(x, out)``: a long run of one center, scale and shift."""


@overload(apply_run)
def _apply_run(x, out, start, stop, center, scale, shift):
    if _never_streams(out):
        return lambda x, out, start, stop, center, scale, shift: apply_reversed(
            x, out, start, stop, center, scale, shift
        )

    def run(x, out, start, stop, center, scale, shift):
        if streams(x, out):
            apply_streamed(x, out, start, stop, center, scale, shift)
        else:
            apply_reversed(x, out, start, stop, center, scale, shift)

    return run


def fence_streams(x, out):
    """Order the streamed stores of ``apply_run`` (where ``streams(x, out)``) before whatever
    this thread does next, such as signalling that its part is done: non-temporal stores are not
    ordered with the others. A no-op otherwise."""


@overload(fence_streams, inline="always")
def _fence_streams(x, out):
    if _never_streams(out):
        return lambda x, out: None

    def fence(x, out):
        if streams(x, out):
            _store_fence()

    return fence
