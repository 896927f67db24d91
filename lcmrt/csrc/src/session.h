// One component's graph on ONNX Runtime's CPU provider (lcmrt/backends/onnxruntime.py OrtSession, CPU path):
// which graph file of the folder to run, session options as the Python backend sets them, and runs with named
// float32/int64 arrays plus, for refit-inputs graphs, the adapter weights fed as inputs.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "manifest.h"

namespace Ort {
struct Session;
}

namespace lcmrt {

struct Array {  // a float32 array, C order
  std::vector<int64_t> shape;
  std::vector<float> values;
};

struct Feed {  // an input of one run: float32 or int64 data the caller keeps alive during the run
  std::string name;
  std::vector<int64_t> shape;
  const float* f32 = nullptr;
  const int64_t* i64 = nullptr;
};

// Refit weights by graph input name (refit-inputs graphs); shared, immutable once made.
using WeightFeeds = std::map<std::string, std::shared_ptr<const Array>>;

class Session {
 public:
  // Loads the component's graph: its refit-inputs variant where the folder has one (adapter weights become inputs),
  // else its ort-cpu variant where it was optimized for this ONNX Runtime and CPU, else its fp32 graph. Verifies
  // the graph files' sha256 first. threads: intra-op threads, 0 for ONNX Runtime's default.
  Session(const Manifest& manifest, const std::string& component, int threads);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Runs the graph (thread safe): returns every output as float32.
  std::map<std::string, Array> run(const std::vector<Feed>& feeds, const WeightFeeds& weights) const;
  bool takes_weight_inputs() const { return takes_weight_inputs_; }
  const std::string& component() const { return component_; }
  const std::string& file() const { return file_; }

 private:
  std::string component_, file_;
  bool takes_weight_inputs_ = false;
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> output_names_;
};

// What a pre-optimized CPU graph depends on (lcmrt/backends/onnxruntime.py cpu_graph_key).
nlohmann::json cpu_graph_key();

}  // namespace lcmrt
