// SiLU of every bf16 value, as bf16 (defined in cpu_decode.cpp beside silu_mul, whose instructions fill it): the
// fused MLP stores of cpu_amx.cpp and cpu_blocked.cpp (blocked_large.h) look it up. Include outside any namespace.
#pragma once
#include <stdint.h>

const uint16_t* memfit_silu_table();
