#include "manifest.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "errors.h"

namespace lcmrt {
namespace {

using json = nlohmann::json;
const char* kRefitFix =
    "Rebuild the folder with `lcmrt build ... --refittable`, or re-add the adapter with `lcmrt adapter add`.";

[[noreturn]] void bad(const std::string& path, const std::string& problem, const std::string& fix = kRebuild) {
  throw folder_error("manifest.json: " + path + " " + problem + ". " + fix);
}

const json& field(const json& obj, const std::string& key, json::value_t kind, const std::string& path,
                  const std::string& fix = kRebuild) {
  const auto it = obj.find(key);
  if (it == obj.end()) bad(path + "." + key, "is missing", fix);
  const bool ok = kind == json::value_t::number_integer
                      ? it->is_number_integer()
                      : kind == json::value_t::number_float ? it->is_number() : it->type() == kind;
  if (!ok) bad(path + "." + key, "has the wrong type (" + std::string(it->type_name()) + ")", fix);
  return *it;
}

std::string string_field(const json& obj, const std::string& key, const std::string& path,
                         const std::string& fix = kRebuild) {
  return field(obj, key, json::value_t::string, path, fix).get<std::string>();
}

int64_t int_field(const json& obj, const std::string& key, const std::string& path, const std::string& fix = kRebuild) {
  return field(obj, key, json::value_t::number_integer, path, fix).get<int64_t>();
}

std::map<std::string, std::string> hashes(const json& obj, const std::string& path) {
  std::map<std::string, std::string> out;
  for (const auto& [name, digest] : field(obj, "sha256", json::value_t::object, path).items()) {
    if (!digest.is_string() || digest.get<std::string>().size() != 64) bad(path + ".sha256." + name, "is not a sha256");
    out[name] = digest.get<std::string>();
  }
  return out;
}

GraphFile graph_file(const json& d, const std::string& path) {
  GraphFile g{string_field(d, "file", path), hashes(d, path), {}, d.value("key", json())};
  if (!g.sha256.count(g.file)) bad(path + ".sha256", "has no hash of its graph '" + g.file + "'");
  if (d.contains("weight_inputs"))
    for (const json& name : field(d, "weight_inputs", json::value_t::array, path))
      g.weight_inputs.push_back(name.get<std::string>());
  return g;
}

Shapes shapes_of(const json& d) {
  Shapes s{};
  const std::string path = "shapes";
  const std::pair<const char*, int*> ints[] = {{"batch", &s.batch},
                                               {"height", &s.height},
                                               {"width", &s.width},
                                               {"latent_channels", &s.latent_channels},
                                               {"latent_height", &s.latent_height},
                                               {"latent_width", &s.latent_width},
                                               {"text_length", &s.text_length}};
  for (const auto& [key, value] : ints) {
    const int64_t v = int_field(d, key, path);
    if (v < 1 || v > 8192) bad(path + "." + key, "is " + std::to_string(v) + ", outside 1..8192");
    *value = static_cast<int>(v);
  }
  for (const json& n : field(d, "unet_batch_sizes", json::value_t::array, path)) {
    if (!n.is_number_integer() || n.get<int64_t>() < 1 || n.get<int64_t>() > 128)
      bad(path + ".unet_batch_sizes", "holds " + n.dump() + ", not a batch size");
    s.unet_batch_sizes.push_back(n.get<int>());
  }
  if (d.contains("sizes")) {
    for (const json& pair : field(d, "sizes", json::value_t::array, path)) {
      if (!pair.is_array() || pair.size() != 2 || !pair[0].is_number_integer() || !pair[1].is_number_integer() ||
          pair[0].get<int64_t>() % 8 || pair[1].get<int64_t>() % 8 || pair[0].get<int64_t>() < 8 ||
          pair[1].get<int64_t>() < 8 || pair[0].get<int64_t>() > 8192 || pair[1].get<int64_t>() > 8192)
        bad(path + ".sizes", "holds " + pair.dump().substr(0, 60) + ", expected [height, width], multiples of 8");
      s.sizes.emplace_back(pair[0].get<int>(), pair[1].get<int>());
    }
  } else {
    s.sizes.emplace_back(s.height, s.width);
  }
  if (s.sizes.empty() || s.sizes[0] != std::make_pair(s.height, s.width))
    bad(path + ".sizes", "does not start with the default size [height, width]");
  if (s.latent_height * 8 != s.height || s.latent_width * 8 != s.width)
    bad(path, "has latents that are not the image size / 8");
  return s;
}

TokenizerInfo tokenizer_of(const json& d, const std::string& key) {
  const json& tok = field(d, key, json::value_t::object, "the document");
  const std::string file = string_field(tok, "path", key) + "/tokenizer.json";
  const auto tok_hashes = hashes(tok, key);
  if (!tok_hashes.count(file)) bad(key + ".sha256", "has no hash of '" + file + "'");
  TokenizerInfo info{file, tok_hashes.at(file), static_cast<int>(int_field(tok, "max_length", key)),
                     int_field(tok, "pad_token_id", key)};
  if (info.max_length < 2 || info.max_length > 1024 || info.pad_token_id < 0)
    bad(key, "has a max_length outside 2..1024 or a negative pad_token_id");
  return info;
}

}  // namespace

Family family_of(const std::string& name) {
  if (name == "sd15") return {name, {"text_encoder"}, "last_hidden_state", "", false};
  if (name == "sdxl" || name == "ssd1b")
    return {name, {"text_encoder", "text_encoder_2"}, "penultimate_hidden_state", "text_encoder_2", true};
  bad("family", "is " + json(name).dump().substr(0, 60) + ", a model family this lcmrt does not know (sd15, sdxl, ssd1b)",
      "Upgrade lcmrt, or rebuild the folder with this version.");
}

const Component& Manifest::component(const std::string& name) const {
  const auto it = components.find(name);
  if (it == components.end()) bad("components", "has no " + name);
  return it->second;
}

Manifest read_manifest(const std::string& folder) {
  struct stat st {};
  if (stat(folder.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw folder_error(folder + " is not a folder. Pass the folder written by `lcmrt build ... --out DIR`.");
  const std::string path = folder + "/manifest.json";
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw folder_error(folder +
                       " is not an lcmrt engine folder: it has no manifest.json. Build one with `lcmrt build MODEL "
                       "--lcm-lora LORA --out DIR`.");
  std::stringstream text;
  text << in.rdbuf();
  json d;
  try {
    d = json::parse(text.str());
  } catch (const json::exception& e) {
    throw folder_error(path + " is not valid JSON (" + std::string(e.what()).substr(0, 200) +
                       "). Rebuild the folder with `lcmrt build`.");
  }
  const auto version = d.is_object() ? d.find("format_version") : d.end();
  if (!d.is_object() || version == d.end() || !version->is_number_integer())
    throw folder_error(path + " has no integer format_version; it was not written by `lcmrt build`.");
  Manifest m;
  m.folder = folder;
  m.format_version = version->get<int>();
  if (m.format_version > kFormatVersion)
    throw folder_error(folder + " was built with engine folder format " + std::to_string(m.format_version) +
                       ", but this lcmrt reads format " + std::to_string(kFormatVersion) +
                       " at most. Upgrade lcmrt (`pip install -U lcmrt`) or rebuild the folder with this version.");
  try {
    m.family = family_of(string_field(d, "family", "the document"));
    m.guidance_mode = string_field(d, "guidance_mode", "the document");
    m.shapes = shapes_of(field(d, "shapes", json::value_t::object, "the document"));
    m.scheduler_config =
        field(field(d, "scheduler", json::value_t::object, "the document"), "config", json::value_t::object, "scheduler");
    for (const std::string& encoder : m.family.text_encoders)  // text_encoder_2 -> tokenizer_2
      m.tokenizers[encoder] = tokenizer_of(d, "tokenizer" + encoder.substr(std::string("text_encoder").size()));
    m.force_zeros_for_empty_prompt = false;
    if (d.contains("conditioning")) {
      const json& conditioning = field(d, "conditioning", json::value_t::object, "the document");
      if (conditioning.contains("force_zeros_for_empty_prompt"))
        m.force_zeros_for_empty_prompt =
            field(conditioning, "force_zeros_for_empty_prompt", json::value_t::boolean, "conditioning").get<bool>();
    }
    for (const auto& [name, entry] : field(d, "components", json::value_t::object, "the document").items()) {
      const std::string where = "components." + name;
      Component c;
      c.graph = graph_file(entry, where);
      if (entry.contains("variants"))
        for (const auto& [variant, e] : field(entry, "variants", json::value_t::object, where).items())
          c.variants[variant] = graph_file(e, where + ".variants." + variant);
      if (entry.contains("inputs"))
        for (const json& t : field(entry, "inputs", json::value_t::array, where))
          c.input_shapes[string_field(t, "name", where + ".inputs")] =
              field(t, "shape", json::value_t::array, where + ".inputs").get<std::vector<json>>();
      m.components[name] = std::move(c);
    }
    if (d.contains("adapters"))
      for (const json& a : field(d, "adapters", json::value_t::array, "the document")) {
        AdapterInfo info{string_field(a, "name", "adapters", kRefitFix),
                         field(a, "weight", json::value_t::number_float, "adapters", kRefitFix).get<double>(),
                         field(a, "fused", json::value_t::boolean, "adapters", kRefitFix).get<bool>(), "", ""};
        if (a.contains("pack") && !a["pack"].is_null()) {
          info.pack = string_field(a, "pack", "adapters." + info.name, kRefitFix);
          info.pack_sha256 = string_field(a, "pack_sha256", "adapters." + info.name, kRefitFix);
        }
        m.adapters.push_back(info);
      }
    if (d.contains("refit_map") && d["refit_map"].is_object())
      for (const auto& [module, e] : d["refit_map"].items()) {
        const std::string where = "refit_map." + module;
        RefitEntry r{module, string_field(e, "component", where, kRefitFix), string_field(e, "weight", where, kRefitFix),
                     field(e, "transpose", json::value_t::boolean, where, kRefitFix).get<bool>(), {}, "", "", "", 0, 0};
        if (!m.components.count(r.component)) bad(where + ".component", "is not a component of the folder", kRefitFix);
        if (e.contains("file") && !e["file"].is_null()) {
          r.file = string_field(e, "file", where, kRefitFix);
          r.dtype = string_field(e, "dtype", where, kRefitFix);
          r.offset = int_field(e, "offset", where, kRefitFix);
          r.length = int_field(e, "length", where, kRefitFix);
          int64_t count = 1;
          for (const json& n : field(e, "shape", json::value_t::array, where, kRefitFix)) {
            if (!n.is_number_integer() || n.get<int64_t>() < 1) bad(where + ".shape", "is not a weight shape", kRefitFix);
            r.shape.push_back(n.get<int64_t>());
            count *= n.get<int64_t>();
          }
          const auto& graph_hashes = m.components[r.component].graph.sha256;
          if (!graph_hashes.count(r.file))
            bad(where + ".file", "is '" + r.file + "', which is not a file of the " + r.component + " graph", kRefitFix);
          r.file_sha256 = graph_hashes.at(r.file);
          if (r.dtype != "float32" || r.shape.empty() || r.shape.size() > 4 || r.offset < 0 || r.length != count * 4)
            bad(where, "does not locate a float32 weight's layout", kRefitFix);
        }
        m.refit_map[module] = r;
      }
  } catch (const json::exception& e) {  // a value of the wrong type deep inside a part
    throw folder_error("manifest.json of " + folder + " has a part of the wrong shape (" + e.what() + "). " + kRebuild);
  }
  return m;
}

}  // namespace lcmrt
