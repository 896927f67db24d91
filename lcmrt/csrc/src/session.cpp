#include "session.h"

#include <sys/utsname.h>

#include <algorithm>
#include <fstream>
#include <set>

#include <onnxruntime_cxx_api.h>

#include "errors.h"
#include "files.h"

namespace lcmrt {
namespace {

// Flags of /proc/cpuinfo that change which kernels ONNX Runtime picks (lcmrt/cpu.py ISA_FLAGS).
const std::set<std::string> kIsaFlags = {"avx",         "avx2",     "fma",      "f16c",     "avx512f",
                                         "avx512bw",    "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                                         "amx_bf16",    "amx_int8", "asimd",    "sve"};

Ort::Env& environment() {
  static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "lcmrt");  // one per process, as ONNX Runtime requires
  return env;
}

std::vector<std::string> cpu_isa() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) == 0 || line.rfind("Features", 0) == 0) {
      std::vector<std::string> found;
      std::istringstream words(line.substr(line.find(':') + 1));
      for (std::string word; words >> word;)
        if (kIsaFlags.count(word)) found.push_back(word);
      std::sort(found.begin(), found.end());
      found.erase(std::unique(found.begin(), found.end()), found.end());
      return found;
    }
  }
  return {};
}

}  // namespace

nlohmann::json cpu_graph_key() {
  utsname names{};
  uname(&names);
  return {{"onnxruntime", Ort::GetVersionString()}, {"machine", names.machine}, {"isa", cpu_isa()}};
}

Session::Session(const Manifest& manifest, const std::string& component, int threads) : component_(component) {
  const Component& c = manifest.component(component);
  const GraphFile* graph = &c.graph;
  bool optimize = true;
  if (const auto refit = c.variants.find(kRefitInputs); refit != c.variants.end()) {
    graph = &refit->second;
    takes_weight_inputs_ = true;
  } else if (const auto pre = c.variants.find(kPreOptimized); pre != c.variants.end() && pre->second.key == cpu_graph_key()) {
    graph = &pre->second;  // built on a CPU like this one: skip ONNX Runtime's graph optimizations at load
    optimize = false;
  }
  verify_files(manifest.folder, graph->sha256, kRebuild);
  file_ = folder_file(manifest.folder, graph->file);
  try {
    Ort::SessionOptions options;
    options.SetGraphOptimizationLevel(optimize ? GraphOptimizationLevel::ORT_ENABLE_ALL
                                               : GraphOptimizationLevel::ORT_DISABLE_ALL);
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    // no arena: it keeps every run's activations (lcmrt/backends/onnxruntime.py has the measurements)
    options.DisableCpuMemArena();
    session_ = std::make_unique<Ort::Session>(environment(), file_.c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;
    for (size_t i = 0; i < session_->GetOutputCount(); ++i)
      output_names_.push_back(session_->GetOutputNameAllocated(i, allocator).get());
  } catch (const Ort::Exception& e) {
    throw backend_error("ONNX Runtime could not load the " + component + " graph " + file_ + ": " + e.what() +
                        ". If the file is damaged, rebuild the folder with `lcmrt build`.");
  }
}

Session::~Session() = default;

std::map<std::string, Array> Session::run(const std::vector<Feed>& feeds, const WeightFeeds& weights) const {
  try {
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<const char*> names;
    std::vector<Ort::Value> values;
    auto count = [](const std::vector<int64_t>& shape) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      return static_cast<size_t>(n);
    };
    for (const Feed& f : feeds) {
      names.push_back(f.name.c_str());
      if (f.f32)
        values.push_back(Ort::Value::CreateTensor<float>(memory, const_cast<float*>(f.f32), count(f.shape),
                                                         f.shape.data(), f.shape.size()));
      else
        values.push_back(Ort::Value::CreateTensor<int64_t>(memory, const_cast<int64_t*>(f.i64), count(f.shape),
                                                           f.shape.data(), f.shape.size()));
    }
    for (const auto& [name, array] : weights) {
      names.push_back(name.c_str());
      values.push_back(Ort::Value::CreateTensor<float>(memory, const_cast<float*>(array->values.data()),
                                                       array->values.size(), array->shape.data(), array->shape.size()));
    }
    std::vector<const char*> outputs;
    for (const std::string& name : output_names_) outputs.push_back(name.c_str());
    auto results = session_->Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), outputs.data(),
                                 outputs.size());
    std::map<std::string, Array> out;
    for (size_t i = 0; i < results.size(); ++i) {
      const auto info = results[i].GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw backend_error(file_ + ": output '" + output_names_[i] + "' is not float32. " + kRebuild);
      const float* data = results[i].GetTensorData<float>();
      out[output_names_[i]] = Array{info.GetShape(), std::vector<float>(data, data + info.GetElementCount())};
    }
    return out;
  } catch (const Ort::Exception& e) {
    throw backend_error("ONNX Runtime failed to run " + component_ + " (" + file_ + "): " + e.what());
  }
}

}  // namespace lcmrt
