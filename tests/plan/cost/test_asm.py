"""Static figures from assembly: instruction classes, FMAs, spills and reloads, only in dispatch sections."""
from memfit.plan.cost.asm import classify, static_figures

ASM = """\t.text
\t.section\t.text.main_dispatch_0_matmul_16x16x32_f32,"ax",@progbits
main_dispatch_0_matmul_16x16x32_f32:
\tpushq\t%rbp
\tvmovups\t(%rax), %zmm0
\tvfmadd231ps\t%zmm1, %zmm2, %zmm0
\tvfmadd231ps\t(%rcx){1to16}, %zmm2, %zmm3
\tvmovups\t%zmm4, 64(%rsp)                 # 64-byte Spill
\tvaddps\t64(%rsp), %zmm0, %zmm0         # 64-byte Folded Reload
\tvmovups\t64(%rsp), %zmm5                 # 64-byte Reload
\taddq\t$64, %rax
\tjne\t.LBB0_1
\tretq
\t.section\t.text.iree_h2f_ieee,"ax",@progbits
iree_h2f_ieee:
\tvfmadd231ps\t%zmm1, %zmm2, %zmm0
\tretq
"""


def test_static_figures_count_only_the_dispatch():
    f = static_figures(ASM)
    assert f["vector_fma"] == 2  # the helper's FMA is not counted
    assert f["spills"] == 1 and f["reloads"] == 2
    assert f["instructions"] == 10
    assert f["branch"] == 1 and f["scalar_arith"] == 1


def test_classify():
    assert classify("vdpbf16ps") == "vector_fma"
    assert classify("vpdpbusd") == "vector_fma"
    assert classify("vmulps") == "vector_arith"
    assert classify("vbroadcastss") == "vector_move"
    assert classify("jmp") == "branch"
    assert classify("leaq") == "scalar_arith"
