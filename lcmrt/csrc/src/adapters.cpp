#include "adapters.h"

#include <cmath>
#include <cstdint>
#include <sstream>

#include "errors.h"

namespace lcmrt {
namespace {

const char* kRefitFix =
    "Rebuild the folder with `lcmrt build ... --refittable`, or re-add the adapter with `lcmrt adapter add`.";

std::string weight_text(double w) {
  std::ostringstream out;
  out << w;
  return out.str();
}

int64_t product(const std::vector<int64_t>& shape, size_t from = 0) {
  int64_t n = 1;
  for (size_t i = from; i < shape.size(); ++i) n *= shape[i];
  return n;
}

}  // namespace

AdapterBank::AdapterBank(const Manifest& manifest) : manifest_(manifest) {
  for (const AdapterInfo& a : manifest.adapters) {
    if (a.fused)
      fused_[a.name] = a.weight;
    else
      refittable_[a.name] = a;
  }
}

AdapterSet AdapterBank::defaults() const {
  AdapterSet out;
  for (const auto& [name, a] : refittable_) out[name] = a.weight;
  return out;
}

AdapterSet AdapterBank::check(const AdapterSet& requested) const {
  for (const auto& [name, weight] : requested) {
    if (!std::isfinite(weight))
      throw adapter_error("Adapter '" + name + "' has weight " + weight_text(weight) +
                          "; weights must be finite numbers.");
    if (const auto f = fused_.find(name); f != fused_.end()) {
      if (weight != f->second)
        throw adapter_error("Adapter '" + name + "' is fused into this folder's graphs at weight " +
                            weight_text(f->second) + ", so its weight cannot change to " + weight_text(weight) +
                            ". Rebuild with --refittable" + (name == "lcm" ? "-lcm" : "") + " to make it swappable.");
    } else if (!refittable_.count(name)) {
      std::string known;
      for (const auto& entry : refittable_) known += (known.empty() ? "" : ", ") + entry.first;
      throw adapter_error("Adapter '" + name + "' is not in " + manifest_.folder + " (refittable adapters: " +
                          (known.empty() ? "none" : known) + "). Add it with `lcmrt adapter add " + manifest_.folder +
                          " FILE --name " + name + "`.");
    }
  }
  AdapterSet full;
  for (const auto& entry : refittable_) {
    const auto it = requested.find(entry.first);
    full[entry.first] = it == requested.end() ? 0.0 : it->second;
  }
  return full;
}

const AdapterBank::Pack& AdapterBank::pack(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (const auto it = packs_.find(name); it != packs_.end()) return it->second;
  const AdapterInfo& adapter = refittable_.at(name);
  if (adapter.pack.empty())
    throw adapter_error("Adapter '" + name + "' of " + manifest_.folder + " has no pack. " + kReadd);
  try {
    verify_files(manifest_.folder, {{adapter.pack, adapter.pack_sha256}}, kReadd);
  } catch (const Error& e) {
    throw adapter_error("Adapter '" + name + "': " + e.what());
  }
  const std::string path = folder_file(manifest_.folder, adapter.pack);
  Pack pack;
  try {
    auto file = std::make_unique<SafetensorsFile>(path);
    const auto& tensors = file->tensors();
    for (const auto& [key, view] : tensors) {
      const std::string suffix = ".down";
      if (key.size() <= suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
      const std::string module = key.substr(0, key.size() - suffix.size());
      const TensorView& down = view;
      const auto up_it = tensors.find(module + ".up"), scale_it = tensors.find(module + ".scale");
      if (up_it == tensors.end() || scale_it == tensors.end())
        throw std::runtime_error(module + ": the pack lacks its up factor or scale");
      const TensorView &up = up_it->second, &scale = scale_it->second;
      const int64_t rank = down.shape.size() >= 2 ? down.shape[0] : 0;
      if (down.dtype != "F32" || up.dtype != "F32" || scale.dtype != "F32" || scale.shape != std::vector<int64_t>{1} ||
          rank < 1 || up.shape.size() != down.shape.size() || up.shape[1] != rank)
        throw std::runtime_error(module + ": down, up and scale are not a float32 LoRA pair of rank >= 1");
      for (const TensorView* t : {&down, &up, &scale})  // read in place as float: 4-byte aligned in the file
        if (reinterpret_cast<uintptr_t>(t->data) % alignof(float) != 0)
          throw std::runtime_error(module + ": a factor is not 4-byte aligned in the file");
      const auto* scale_value = reinterpret_cast<const float*>(scale.data);
      const auto* down_values = reinterpret_cast<const float*>(down.data);
      const auto* up_values = reinterpret_cast<const float*>(up.data);
      bool finite = std::isfinite(*scale_value);
      for (size_t i = 0; finite && i < down.bytes / 4; ++i) finite = std::isfinite(down_values[i]);
      for (size_t i = 0; finite && i < up.bytes / 4; ++i) finite = std::isfinite(up_values[i]);
      if (!finite) throw std::runtime_error(module + ": the factors hold NaN or inf");
      if (!manifest_.refit_map.count(module)) {
        throw folder_error("Adapter '" + name + "' changes a module the refit map of " + manifest_.folder +
                           " lacks, e.g. " + module + ". " + kRefitFix);
      }
      pack[module] = Factors{down_values, up_values, rank, product(down.shape, 1), *scale_value};
    }
    files_[name] = std::move(file);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw adapter_error("Adapter pack " + path + " of '" + name + "' is damaged (" + e.what() + "). " + kReadd);
  }
  return packs_[name] = std::move(pack);
}

const float* AdapterBank::base(const RefitEntry& entry) const {
  if (entry.file.empty())
    throw folder_error("The refit map of " + manifest_.folder + " does not say where " + entry.module +
                       "'s weight is stored. " + kRefitFix);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = bases_.find(entry.file);
  if (it == bases_.end()) {
    verify_files(manifest_.folder, {{entry.file, entry.file_sha256}}, kRefitFix);
    it = bases_.emplace(entry.file, std::make_unique<MappedFile>(folder_file(manifest_.folder, entry.file))).first;
  }
  if (static_cast<size_t>(entry.offset + entry.length) > it->second->size())
    throw folder_error("The refit map of " + manifest_.folder + " places " + entry.module + "'s weight at bytes " +
                       std::to_string(entry.offset) + "+" + std::to_string(entry.length) + ", past the end of " +
                       entry.file + ". " + kRefitFix);
  return reinterpret_cast<const float*>(it->second->data() + entry.offset);
}

std::shared_ptr<const Array> AdapterBank::merged(
    const RefitEntry& entry, const std::vector<std::pair<std::string, double>>& contributions) const {
  const int64_t out_features = entry.shape[0], in_features = product(entry.shape, 1);
  auto result = std::make_shared<Array>();
  result->shape = entry.transpose ? std::vector<int64_t>(entry.shape.rbegin(), entry.shape.rend()) : entry.shape;
  result->values.assign(static_cast<size_t>(out_features * in_features), 0.0f);
  std::vector<float> row(static_cast<size_t>(in_features));
  for (const auto& [name, weight] : contributions) {
    const Factors& f = pack(name).at(entry.module);
    if (f.in != in_features)
      throw adapter_error("Adapter '" + name + "' changes " + entry.module +
                          " with factors that do not make its weight. " + kReadd);
    const float factor = static_cast<float>(weight * f.scale);
    for (int64_t o = 0; o < out_features; ++o) {
      std::fill(row.begin(), row.end(), 0.0f);  // delta[o, :] = sum_k (up[o, k] * factor) * down[k, :]
      for (int64_t k = 0; k < f.rank; ++k) {
        const float u = f.up[o * f.rank + k] * factor;
        const float* d = f.down + k * in_features;
        for (int64_t i = 0; i < in_features; ++i) row[i] += u * d[i];
      }
      float* total = result->values.data();
      if (entry.transpose)  // the exporter stored W^T: [in, out]
        for (int64_t i = 0; i < in_features; ++i) total[i * out_features + o] += row[i];
      else
        for (int64_t i = 0; i < in_features; ++i) total[o * in_features + i] += row[i];
    }
  }
  const float* pristine = base(entry);
  for (size_t i = 0; i < result->values.size(); ++i) result->values[i] += pristine[i];
  return result;
}

std::map<std::string, WeightFeeds> AdapterBank::weights_for(const AdapterSet& active) const {
  // module -> the adapters (by name, the order Python sums them in) that change it
  std::map<std::string, std::vector<std::pair<std::string, double>>> contributions;
  for (const auto& [name, weight] : active)
    if (weight != 0.0)
      for (const auto& module : pack(name)) contributions[module.first].emplace_back(name, weight);
  std::map<std::string, WeightFeeds> feeds;
  for (const auto& [module, by] : contributions) {
    const RefitEntry& entry = manifest_.refit_map.at(module);
    feeds[entry.component][entry.weight] = merged(entry, by);
  }
  return feeds;
}

}  // namespace lcmrt
