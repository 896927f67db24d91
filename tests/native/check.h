// A minimal check harness for the native tests: CHECK(cond) and CHECK_EQ(a, b) record failures with file:line,
// and check_exit() is main's return value (ctest reads a non-zero exit as a failure).
#pragma once

#include <iostream>
#include <sstream>

inline int& check_failures() {
  static int failures = 0;
  return failures;
}

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      ++check_failures();                                                             \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed\n";      \
    }                                                                                 \
  } while (0)

#define CHECK_EQ(a, b)                                                                            \
  do {                                                                                            \
    const auto& check_a_ = (a);                                                                   \
    const auto& check_b_ = (b);                                                                   \
    if (!(check_a_ == check_b_)) {                                                                \
      ++check_failures();                                                                         \
      std::ostringstream check_out_;                                                              \
      check_out_ << __FILE__ << ":" << __LINE__ << ": CHECK_EQ(" #a ", " #b ") failed: " << check_a_ \
                 << " != " << check_b_ << "\n";                                                   \
      std::cerr << check_out_.str();                                                              \
    }                                                                                             \
  } while (0)

inline int check_exit() {
  if (check_failures()) std::cerr << check_failures() << " check(s) failed\n";
  return check_failures() ? 1 : 0;
}
