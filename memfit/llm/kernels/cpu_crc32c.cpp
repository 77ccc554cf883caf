// CRC-32C (Castagnoli, the iSCSI/ext4 polynomial 0x1EDC6F41, reflected 0x82F63B78) with the SSE4.2 `crc32`
// instruction: the SSD swap tier's checksum (kv/checksum.py). zlib's table-driven CRC-32 runs at ~2 GB/s of CPU
// time here, slower than the disk it guards; the instruction does 8 bytes per call at a latency of 3 cycles,
// so three independent streams over thirds of a block keep it busy every cycle (~3x one stream), and the
// three partial CRCs are joined by shifting the first two over the length of what follows them (multiplying
// by x^(8*len) mod P, done here by running the CRC over zero bytes' worth of shift with a precomputed table
// of x^(2^k) powers). `memfit_crc32c(data, n, crc)` continues `crc` (0 to start) over n bytes, as
// zlib.crc32(data, crc) continues its own, and returns the new value.
#include <nmmintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

constexpr uint32_t POLY = 0x82F63B78u;  // reflected Castagnoli polynomial

// a * b mod P, both polynomials in reflected bit order (bit 31 = x^0)
uint32_t gf_mul(uint32_t a, uint32_t b) {
    if (a == 0) return 0;
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

// x^(8 * n) mod P: the factor that moves a CRC over n more (zero) bytes
uint32_t x8n(uint64_t n) {
    uint32_t result = 1u << 31;  // x^0
    uint32_t power = 1u << 23;   // x^8 (x^(8 * 2^0))
    while (n) {
        if (n & 1) result = gf_mul(result, power);
        power = gf_mul(power, power);
        n >>= 1;
    }
    return result;
}

inline uint32_t crc_bytes(uint32_t c, const uint8_t* p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = (uint32_t)_mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    while (n--) c = _mm_crc32_u8(c, *p++);
    return c;
}

constexpr size_t LANE = 8192;  // bytes per stream per round: three of them in flight

}  // namespace

extern "C" uint32_t memfit_crc32c(const uint8_t* data, size_t n, uint32_t crc) {
    uint32_t c = ~crc;
    static const uint32_t shift = x8n(LANE);  // moves a lane's CRC over the next lane
    while (n >= 3 * LANE) {
        const uint8_t* a = data;
        const uint8_t* b = data + LANE;
        const uint8_t* d = data + 2 * LANE;
        uint32_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t va, vb, vd;
            memcpy(&va, a + i, 8);
            memcpy(&vb, b + i, 8);
            memcpy(&vd, d + i, 8);
            c = (uint32_t)_mm_crc32_u64(c, va);
            c1 = (uint32_t)_mm_crc32_u64(c1, vb);
            c2 = (uint32_t)_mm_crc32_u64(c2, vd);
        }
        // crc(A B D) = shift(shift(crc(A)) ^ crc0(B)) ^ crc0(D), crc0: started from 0 (linearity over GF(2))
        c = gf_mul(gf_mul(c, shift) ^ c1, shift) ^ c2;
        data += 3 * LANE;
        n -= 3 * LANE;
    }
    return ~crc_bytes(c, data, n);
}
