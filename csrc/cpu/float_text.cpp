// Decimal text of a float64 exactly as Python's repr() writes it: the shortest digits that read
// back to the same value, fixed notation for decimal exponents -4..15, else d.ddde+XX.
//
// Why here: relex_report.json holds every tensor's T singular values, and a MoE model has
// thousands of tensors; float.__repr__ through json's encoder took ~45 ms of a 3072-tensor run
// (0.5 us a value), this ~20x less. The text is json.dumps's, byte for byte
// (tests/test_native_eigh_and_text.py compares them over random bit patterns and the edge values).
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace relex {

namespace {

#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
#define RELEX_FLOAT_TEXT 1

// The shortest digits of finite x > 0 that read back to x (the closest such, as Python's dtoa
// picks), with x = 0.d1d2... * 10^decpt; returns the digit count. (No printf fallback: its
// correctly rounded digits are not the shortest at powers of two, and it follows the locale.)
int shortest_digits(double x, char* digits, int* decpt) {
    char buf[64];
    const auto res = std::to_chars(buf, buf + sizeof(buf) - 1, x, std::chars_format::scientific);
    *res.ptr = '\0';
    int nd = 0;
    const char* p = buf;
    for (; *p && *p != 'e'; ++p)
        if (*p != '.') digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0') --nd;
    *decpt = std::atoi(p + 1) + 1;
    return nd;
}
#endif

}  // namespace

#ifdef RELEX_FLOAT_TEXT
bool float_text_supported() { return true; }

void append_float_text(double x, std::string& out) {
    if (std::isnan(x)) {
        out += "NaN";
        return;
    }
    if (std::isinf(x)) {
        out += x > 0 ? "Infinity" : "-Infinity";
        return;
    }
    if (std::signbit(x)) {
        out += '-';
        x = -x;
    }
    if (x == 0.0) {
        out += "0.0";
        return;
    }
    char digits[40];
    int decpt = 0;
    const int nd = shortest_digits(x, digits, &decpt);
    if (decpt <= -4 || decpt > 16) {  // Python's float_repr_style 'short' switch to exponents
        out += digits[0];
        if (nd > 1) {
            out += '.';
            out.append(digits + 1, size_t(nd - 1));
        }
        const int e = decpt - 1;
        char eb[16];
        std::snprintf(eb, sizeof(eb), "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
        out += eb;
    } else if (decpt <= 0) {
        out += "0.";
        out.append(size_t(-decpt), '0');
        out.append(digits, size_t(nd));
    } else if (decpt >= nd) {
        out.append(digits, size_t(nd));
        out.append(size_t(decpt - nd), '0');
        out += ".0";
    } else {
        out.append(digits, size_t(decpt));
        out += '.';
        out.append(digits + decpt, size_t(nd - decpt));
    }
}
#else
// A standard library without floating-point std::to_chars (libstdc++ before GCC 11, libc++):
// the report's floats go through Python's repr instead.
bool float_text_supported() { return false; }

void append_float_text(double, std::string&) {
    throw std::logic_error("float text needs a standard library with floating-point std::to_chars");
}
#endif

}  // namespace relex
