// The native runtime's errors by kind (lcmrt::Error of lcmrt/error.hpp, turned into a status code and message at the
// C API in c_api.cpp); messages follow the Python runtime's (they name the problem and the fix).
#pragma once

#include <string>

#include "lcmrt/error.hpp"

namespace lcmrt {

// Python's EngineFolderError, InputError, AdapterError, GenerationError, BackendError.
inline Error folder_error(const std::string& message) { return Error(LCMRT_ERROR_ENGINE_FOLDER, message); }
inline Error input_error(const std::string& message) { return Error(LCMRT_ERROR_INVALID_ARGUMENT, message); }
inline Error adapter_error(const std::string& message) { return Error(LCMRT_ERROR_ADAPTER, message); }
inline Error generation_error(const std::string& message) { return Error(LCMRT_ERROR_GENERATION, message); }
inline Error backend_error(const std::string& message) { return Error(LCMRT_ERROR_BACKEND, message); }
inline Error io_error(const std::string& message) { return Error(LCMRT_ERROR_IO, message); }

// The Python runtime's fixes (lcmrt/manifest.py REBUILD, REFIT_FIX; lcmrt/adapters.py READD).
inline const char* kRebuild = "Rebuild the folder with `lcmrt build`.";
inline const char* kReadd = "Re-add the adapter with `lcmrt adapter add`.";

}  // namespace lcmrt
