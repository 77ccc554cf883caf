// A block of strided rows copied in one call: the swap tiers' by-address copies (kv/swap_layout.py RowBlock,
// kernels/copy_rows.py). A swap of a CPU virtual cache moves one row a segment (2 x layers of them, 48 at the
// 0.5B shape); through ctypes.memmove that is a foreign call and a GIL hand-over a row, which made a reuse
// swap-out of 16 new tokens (48 rows of 8 KiB) 16-21 us slower, 1.20-1.30x (benchmarks/swap_tiers.py --modes
// address-memmove address). Here the loop is in C, one call and one GIL release a block. The rows must not overlap (a KV slot and a host buffer never do).
#include <stdint.h>
#include <string.h>

extern "C" void memfit_copy_rows(char* dst, int64_t dst_stride, const char* src, int64_t src_stride, int64_t rows,
                                 int64_t row_bytes) {
    for (int64_t i = 0; i < rows; ++i) memcpy(dst + i * dst_stride, src + i * src_stride, (size_t)row_bytes);
}
