// Refittable adapters (lcmrt/adapters.py): graph weights for an adapter set, always computed from the folder's
// pristine base weights, W = W_base + sum_i w_i * scale_i * up_i @ down_i, so A -> B -> A gives A bit for bit.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "files.h"
#include "manifest.h"
#include "safetensors.h"
#include "session.h"

namespace lcmrt {

using AdapterSet = std::map<std::string, double>;  // refittable adapter -> weight (0: off)

class AdapterBank {
 public:
  explicit AdapterBank(const Manifest& manifest);

  // The refittable adapters' weights as built.
  AdapterSet defaults() const;
  // Check a requested set against the folder (Python's messages); the full refittable set, unlisted adapters at 0.
  AdapterSet check(const AdapterSet& requested) const;
  // {component: weight feeds} for `active`: the merged weight of every module an active adapter changes (the
  // others keep the graph's own initializer, the base).
  std::map<std::string, WeightFeeds> weights_for(const AdapterSet& active) const;
  const std::map<std::string, double>& fused() const { return fused_; }

 private:
  struct Factors {
    const float* down;  // [r, in...]
    const float* up;    // [out, r, (1, 1)]
    int64_t rank, in;   // in: elements per rank row of down (in * kh * kw)
    float scale;
  };
  using Pack = std::map<std::string, Factors>;  // module -> factors
  const Pack& pack(const std::string& name) const;
  std::shared_ptr<const Array> merged(const RefitEntry& entry,
                                      const std::vector<std::pair<std::string, double>>& contributions) const;
  const float* base(const RefitEntry& entry) const;

  const Manifest& manifest_;
  std::map<std::string, double> fused_;
  std::map<std::string, AdapterInfo> refittable_;
  mutable std::mutex mutex_;  // guards the caches below
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  mutable std::map<std::string, Pack> packs_;
  mutable std::map<std::string, std::unique_ptr<MappedFile>> bases_;
};

}  // namespace lcmrt
