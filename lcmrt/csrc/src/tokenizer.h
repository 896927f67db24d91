// CLIP prompt tokenization identical to the Python runtime's (lcmrt/tokenizer.py, which runs the `tokenizers`
// library on the engine folder's tokenizer.json): the tokenizer.json's added tokens, normalizer (NFC, \s+ -> " ",
// lowercase), pre-tokenizer (CLIP's split regex, then byte-level), BPE with "</w>" word ends, bos/eos, truncation
// keeping eos, right padding.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lcmrt {

class ClipTokenizer {
 public:
  // Reads FOLDER's tokenizer.json at `path` (engine-folder error naming `lcmrt build` if missing or malformed).
  ClipTokenizer(const std::string& path, int max_length, int64_t pad_token_id);
  ~ClipTokenizer();
  ClipTokenizer(const ClipTokenizer&) = delete;
  ClipTokenizer& operator=(const ClipTokenizer&) = delete;

  // Input ids for one UTF-8 prompt: exactly max_length ids (bos, tokens, eos, pads). `dropped`, if given, receives
  // the number of tokens cut from a too-long prompt (0 if none). Invalid UTF-8 is an input_error.
  std::vector<int64_t> encode(const std::string& prompt, size_t* dropped = nullptr) const;
  int max_length() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lcmrt
