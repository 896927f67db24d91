// lcmrt::Error: a status of lcmrt.h with its message. The C++ API (lcmrt.hpp) throws it for a failed call; inside
// liblcmrt it carries an error to the C API, which turns it back into the status and message.
#pragma once

#include <stdexcept>
#include <string>

#include "lcmrt/lcmrt.h"

namespace lcmrt {

class Error : public std::runtime_error {
 public:
  Error(lcmrt_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  lcmrt_status status() const { return status_; }

 private:
  lcmrt_status status_;
};

}  // namespace lcmrt
