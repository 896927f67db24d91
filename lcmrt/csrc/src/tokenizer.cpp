// CLIP's tokenizer.json run the way the Hugging Face `tokenizers` library (Rust) runs it, step for step, so that
// the ids match lcmrt/tokenizer.py's bit for bit: added tokens split off the raw text (added_vocabulary.rs), the
// normalizer, the Split and ByteLevel pre-tokenizers (their Oniguruma regexes written out by hand), BPE
// (models/bpe/word.rs merge_all) and RobertaProcessing's bos/eos. A tokenizer.json configured otherwise would
// tokenize differently, so it is refused rather than approximated.
// Unicode data (NFC, categories, White_Space, lowercase) comes from ICU, so characters assigned after ICU's Unicode
// version (ICU 72: Unicode 15.0; the library's Oniguruma and Rust know later ones, e.g. Garay, Todhri, CJK
// extension I) are unassigned here and split as punctuation where the library sees letters or numbers.
#include "tokenizer.h"

#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/utf16.h>
#include <unicode/utf8.h>

#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>

#include "errors.h"

namespace lcmrt {
namespace {

using json = nlohmann::json;

// The parts of tokenizer.json this file implements; keys not named here (offsets trimming, the decoder) do not
// change ids.
const json kNormalizer = json::parse(R"({"type": "Sequence", "normalizers": [
  {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]})");
const json kPreTokenizer = json::parse(R"({"type": "Sequence", "pretokenizers": [
  {"type": "Split", "behavior": "Removed", "invert": true, "pattern": {"Regex":
    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}},
  {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]})");
const std::string kEndOfWord = "</w>";
// The Split pattern's literal alternatives: they match only text that became a special token's string through
// normalization (e.g. "<|ENDOFTEXT|>"), as the exact strings were split off as added tokens before.
const std::array<std::u32string, 2> kSplitLiterals = {U"<|startoftext|>", U"<|endoftext|>"};
// The contraction alternatives that both regexes try first, in their order.
const std::array<std::u32string, 7> kContractions = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};

// Whether `actual` has every key and value of `expected` (arrays element by element).
bool matches(const json& actual, const json& expected) {
  if (expected.is_object()) {
    if (!actual.is_object()) return false;
    for (const auto& [key, value] : expected.items())
      if (!actual.contains(key) || !matches(actual[key], value)) return false;
    return true;
  }
  if (expected.is_array()) {
    if (!actual.is_array() || actual.size() != expected.size()) return false;
    for (size_t i = 0; i < expected.size(); ++i)
      if (!matches(actual[i], expected[i])) return false;
    return true;
  }
  return actual == expected;
}

// Oniguruma's classes on code points: \s (Unicode White_Space), \p{L}, \p{N}, and everything else.
enum class CharClass { kSpace, kLetter, kNumber, kOther };

CharClass char_class(UChar32 c) {
  if (u_isUWhiteSpace(c)) return CharClass::kSpace;
  const uint32_t category = U_GET_GC_MASK(c);
  if (category & U_GC_L_MASK) return CharClass::kLetter;
  if (category & U_GC_N_MASK) return CharClass::kNumber;
  return CharClass::kOther;
}

// A normalized text: its code points and their classes.
struct Text {
  std::u32string chars;
  std::vector<CharClass> classes;

  void push(UChar32 c) {
    chars.push_back(static_cast<char32_t>(c));
    classes.push_back(char_class(c));
  }
  size_t literal_at(size_t pos, const std::u32string& literal) const {
    return chars.compare(pos, literal.size(), literal) == 0 ? literal.size() : 0;
  }
  size_t contraction_at(size_t pos) const {
    for (const auto& contraction : kContractions)
      if (size_t n = literal_at(pos, contraction)) return n;
    return 0;
  }
  size_t run_at(size_t pos, CharClass c) const {
    size_t end = pos;
    while (end < chars.size() && classes[end] == c) ++end;
    return end - pos;
  }
};

// A piece of a Text: [begin, end).
struct Span {
  size_t begin, end;
};

// The Split pre-tokenizer: the pattern's matches, leftmost first, alternatives in order; the whitespace between
// them is dropped.
std::vector<Span> split_pieces(const Text& text) {
  std::vector<Span> pieces;
  size_t pos = 0;
  while (pos < text.chars.size()) {
    size_t n = 0;
    for (const auto& literal : kSplitLiterals)
      if (!n) n = text.literal_at(pos, literal);
    if (!n) n = text.contraction_at(pos);
    if (!n) n = text.run_at(pos, CharClass::kLetter);
    if (!n && text.classes[pos] == CharClass::kNumber) n = 1;
    if (!n) n = text.run_at(pos, CharClass::kOther);
    if (n) pieces.push_back({pos, pos + n});
    pos += n ? n : 1;
  }
  return pieces;
}

// ByteLevel's GPT-2 regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) on a piece
// without whitespace, where its space alternatives never match. It leaves Split's pieces whole except its literals,
// which it cuts into "<|", letters, "|>".
std::vector<Span> byte_level_words(const Text& text, Span piece) {
  std::vector<Span> words;
  for (size_t pos = piece.begin; pos < piece.end;) {
    size_t n = text.contraction_at(pos);
    if (!n) n = text.run_at(pos, text.classes[pos]);
    n = std::min(n, piece.end - pos);
    words.push_back({pos, pos + n});
    pos += n;
  }
  return words;
}

void append_utf8(std::string& out, char32_t c) {
  uint8_t buffer[U8_MAX_LENGTH];
  int32_t length = 0;
  U8_APPEND_UNSAFE(buffer, length, static_cast<UChar32>(c));
  out.append(reinterpret_cast<const char*>(buffer), static_cast<size_t>(length));
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the others for U+0100 onwards in order.
std::array<std::string, 256> byte_symbols() {
  std::array<std::string, 256> symbols;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    append_utf8(symbols[b], printable ? static_cast<char32_t>(b) : next++);
  }
  return symbols;
}

uint64_t pair_key(uint32_t left, uint32_t right) { return (static_cast<uint64_t>(left) << 32) | right; }

struct Merge {
  uint32_t rank;  // position in the merges list: lower merges first
  uint32_t id;    // the merged symbol's id
};

// One entry of merge_all's queue: the pair starting at symbol `pos`.
struct QueuedMerge {
  uint32_t rank;
  size_t pos;
  uint32_t id;
  // std::priority_queue pops the greatest: make that the lowest rank, then the leftmost.
  bool operator<(const QueuedMerge& other) const {
    return rank != other.rank ? rank > other.rank : pos > other.pos;
  }
};

struct Symbol {
  uint32_t id;
  long prev, next;  // neighbours' indices, -1 at the ends
  bool merged_away;
};

}  // namespace

struct ClipTokenizer::Impl {
  std::string path;
  int max_length;
  int64_t pad_token_id;
  std::vector<std::pair<std::string, uint32_t>> added_tokens;  // content, id; matched on the raw text
  std::unordered_map<std::string, uint32_t> vocab;
  std::unordered_map<uint64_t, Merge> merges;
  // Each byte's symbol id inside a word and at its end ("</w>" appended); -1 where the vocab lacks it.
  std::array<int64_t, 256> byte_ids, end_byte_ids;
  uint32_t unk_id, bos_id, eos_id;
  const UNormalizer2* nfc_normalizer;

  [[noreturn]] void unsupported(const std::string& problem) const {
    throw folder_error(path + " is not a CLIP tokenizer this runtime reads: " + problem + ". " + kRebuild);
  }
  uint32_t vocab_id(const std::string& token, const std::string& where) const {
    const auto it = vocab.find(token);
    if (it == vocab.end()) unsupported(where + " '" + token + "' is not in the vocab");
    return it->second;
  }
  void load(const json& d);
  void load_model(const json& model);
  std::vector<UChar> nfc_utf16(const std::string& utf8) const;
  Text normalize(const std::string& utf8) const;
  void tokenize_word(const Text& text, Span word, std::vector<int64_t>& ids) const;
  void tokenize_segment(const std::string& utf8, std::vector<int64_t>& ids) const;
};

void ClipTokenizer::Impl::load(const json& d) {
  if (!matches(d.value("normalizer", json()), kNormalizer))
    unsupported("its normalizer is not NFC, \\s+ -> ' ', Lowercase");
  if (!matches(d.value("pre_tokenizer", json()), kPreTokenizer))
    unsupported("its pre_tokenizer is not CLIP's Split pattern followed by ByteLevel");
  for (const json& token : d.value("added_tokens", json::array())) {
    if (token.value("normalized", true) || token.value("lstrip", true) || token.value("rstrip", true) ||
        token.value("single_word", true))
      unsupported("added token " + token.dump() + " is normalized, stripped or single-word");
    const std::string content = token.at("content").get<std::string>();
    if (content.empty()) unsupported("an added token is empty");
    added_tokens.emplace_back(content, token.at("id").get<uint32_t>());
  }
  load_model(d.at("model"));
  const json& post = d.at("post_processor");
  if (post.value("type", "") != "RobertaProcessing") unsupported("its post_processor is not RobertaProcessing");
  bos_id = post.at("cls").at(1).get<uint32_t>();
  eos_id = post.at("sep").at(1).get<uint32_t>();
}

void ClipTokenizer::Impl::load_model(const json& model) {
  if (model.value("type", "") != "BPE") unsupported("its model is not BPE");
  if (!model.value("dropout", json()).is_null() || model.value("fuse_unk", false) ||
      model.value("byte_fallback", false) || model.value("ignore_merges", false))
    unsupported("its BPE model uses dropout, fuse_unk, byte_fallback or ignore_merges");
  if (model.value("end_of_word_suffix", json()) != kEndOfWord) unsupported("its BPE end_of_word_suffix is not </w>");
  const json prefix = model.value("continuing_subword_prefix", json());
  if (!prefix.is_null() && prefix != "") unsupported("its BPE has a continuing_subword_prefix");

  for (const auto& [token, id] : model.at("vocab").items()) vocab[token] = id.get<uint32_t>();
  uint32_t rank = 0;
  for (const json& merge : model.at("merges")) {
    // transformers writes merges as ["a", "b"], older versions as "a b"
    std::string left, right;
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos) unsupported("merge '" + text + "' is not two tokens");
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else {
      left = merge.at(0).get<std::string>();
      right = merge.at(1).get<std::string>();
    }
    // a pair listed twice keeps its last rank, as the library's map does
    merges[pair_key(vocab_id(left, "merge token"), vocab_id(right, "merge token"))] = {
        rank++, vocab_id(left + right, "merged token")};
  }
  unk_id = vocab_id(model.at("unk_token").get<std::string>(), "unk_token");
  const auto symbols = byte_symbols();
  for (int b = 0; b < 256; ++b) {
    const auto inside = vocab.find(symbols[b]);
    const auto at_end = vocab.find(symbols[b] + kEndOfWord);
    byte_ids[b] = inside == vocab.end() ? -1 : static_cast<int64_t>(inside->second);
    end_byte_ids[b] = at_end == vocab.end() ? -1 : static_cast<int64_t>(at_end->second);
  }
}

std::vector<UChar> ClipTokenizer::Impl::nfc_utf16(const std::string& utf8) const {
  UErrorCode status = U_ZERO_ERROR;
  int32_t length = 0;
  std::vector<UChar> utf16(utf8.size() + 1);
  u_strFromUTF8(utf16.data(), static_cast<int32_t>(utf16.size()), &length, utf8.data(),
                static_cast<int32_t>(utf8.size()), &status);
  std::vector<UChar> nfc(static_cast<size_t>(length) * 3 + 1);  // NFC grows UTF-16 at most threefold
  const int32_t nfc_length = unorm2_normalize(nfc_normalizer, utf16.data(), length, nfc.data(),
                                              static_cast<int32_t>(nfc.size()), &status);
  if (U_FAILURE(status)) throw input_error(std::string("ICU could not normalize the prompt: ") + u_errorName(status));
  nfc.resize(static_cast<size_t>(nfc_length));
  return nfc;
}

// NFC, then each run of whitespace as one space, then each code point lowercased on its own (Rust's
// char::to_lowercase: full mappings such as İ -> i̇, and no final-sigma context).
Text ClipTokenizer::Impl::normalize(const std::string& utf8) const {
  const std::vector<UChar> nfc_text = nfc_utf16(utf8);
  Text text;
  bool in_space = false;
  for (int32_t i = 0; i < static_cast<int32_t>(nfc_text.size());) {
    UChar32 c;
    U16_NEXT(nfc_text.data(), i, static_cast<int32_t>(nfc_text.size()), c);
    if (u_isUWhiteSpace(c)) {
      if (!in_space) text.push(' ');
      in_space = true;
      continue;
    }
    in_space = false;
    if (c < 0x80) {
      text.push(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
      continue;
    }
    UChar one[U16_MAX_LENGTH], lower[8];
    int32_t one_length = 0;
    U16_APPEND_UNSAFE(one, one_length, c);
    UErrorCode status = U_ZERO_ERROR;
    const int32_t lower_length = u_strToLower(lower, 8, one, one_length, "", &status);  // "": the root locale
    if (U_FAILURE(status)) throw input_error(std::string("ICU could not lowercase the prompt: ") + u_errorName(status));
    for (int32_t j = 0; j < lower_length;) {
      UChar32 lc;
      U16_NEXT(lower, j, lower_length, lc);
      text.push(lc);
    }
  }
  return text;
}

// BPE on one word's bytes: one symbol per byte (the last with "</w>"), the unk id for symbols not in the vocab, then
// word.rs merge_all: lowest rank first, leftmost among equals, skipping queue entries that no longer apply.
void ClipTokenizer::Impl::tokenize_word(const Text& text, Span word, std::vector<int64_t>& ids) const {
  std::string bytes;
  for (size_t i = word.begin; i < word.end; ++i) append_utf8(bytes, text.chars[i]);
  std::vector<Symbol> symbols;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const auto b = static_cast<uint8_t>(bytes[i]);
    const int64_t id = i + 1 == bytes.size() ? end_byte_ids[b] : byte_ids[b];
    symbols.push_back({id < 0 ? unk_id : static_cast<uint32_t>(id), static_cast<long>(i) - 1,
                       i + 1 == bytes.size() ? -1 : static_cast<long>(i) + 1, false});
  }
  std::priority_queue<QueuedMerge> queue;
  const auto enqueue = [&](size_t pos) {
    const Symbol& left = symbols[pos];
    if (left.next < 0) return;
    const auto it = merges.find(pair_key(left.id, symbols[static_cast<size_t>(left.next)].id));
    if (it != merges.end()) queue.push({it->second.rank, pos, it->second.id});
  };
  for (size_t pos = 0; pos + 1 < symbols.size(); ++pos) enqueue(pos);
  while (!queue.empty()) {
    const QueuedMerge top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.merged_away || left.next < 0) continue;
    Symbol& right = symbols[static_cast<size_t>(left.next)];
    // like the library, an entry is current if the pair now there merges into the same id
    const auto it = merges.find(pair_key(left.id, right.id));
    if (it == merges.end() || it->second.id != top.id) continue;
    left.id = top.id;
    left.next = right.next;
    right.merged_away = true;
    if (left.next >= 0) symbols[static_cast<size_t>(left.next)].prev = static_cast<long>(top.pos);
    if (left.prev >= 0) enqueue(static_cast<size_t>(left.prev));
    enqueue(top.pos);
  }
  for (const Symbol& s : symbols)
    if (!s.merged_away) ids.push_back(s.id);
}

void ClipTokenizer::Impl::tokenize_segment(const std::string& utf8, std::vector<int64_t>& ids) const {
  const Text text = normalize(utf8);
  for (const Span piece : split_pieces(text))
    for (const Span word : byte_level_words(text, piece)) tokenize_word(text, word, ids);
}

ClipTokenizer::ClipTokenizer(const std::string& path, int max_length, int64_t pad_token_id)
    : impl_(std::make_unique<Impl>()) {
  if (max_length < 2) throw input_error("max_length must hold at least bos and eos, got " + std::to_string(max_length));
  impl_->path = path;
  impl_->max_length = max_length;
  impl_->pad_token_id = pad_token_id;
  std::ifstream file(path, std::ios::binary);
  if (!file)
    throw folder_error(path + " is missing: the engine folder's tokenizer was not written. " + kRebuild);
  std::ostringstream text;
  text << file.rdbuf();
  try {
    impl_->load(json::parse(text.str()));
  } catch (const json::exception& e) {
    throw folder_error(path + " is not a tokenizer file (" + std::string(e.what()).substr(0, 200) + "). " + kRebuild);
  }
  UErrorCode status = U_ZERO_ERROR;
  impl_->nfc_normalizer = unorm2_getNFCInstance(&status);
  if (U_FAILURE(status)) throw folder_error(std::string("ICU has no NFC data: ") + u_errorName(status));
}

ClipTokenizer::~ClipTokenizer() = default;

int ClipTokenizer::max_length() const { return impl_->max_length; }

std::vector<int64_t> ClipTokenizer::encode(const std::string& prompt, size_t* dropped) const {
  for (int32_t i = 0; i < static_cast<int32_t>(prompt.size());) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(prompt.data(), i, static_cast<int32_t>(prompt.size()), c);
    if (c < 0)
      throw input_error("the prompt is not valid UTF-8 (byte " + std::to_string(start) +
                        "): pass the prompt as UTF-8 text");
  }
  std::vector<int64_t> ids = {impl_->bos_id};
  // added tokens: leftmost occurrence first, the longest among those starting there
  for (size_t pos = 0; pos < prompt.size();) {
    size_t found = std::string::npos;
    const std::pair<std::string, uint32_t>* token = nullptr;
    for (const auto& candidate : impl_->added_tokens) {
      const size_t at = prompt.find(candidate.first, pos);
      if (at < found || (at == found && at != std::string::npos && candidate.first.size() > token->first.size())) {
        found = at;
        token = &candidate;
      }
    }
    impl_->tokenize_segment(prompt.substr(pos, found == std::string::npos ? std::string::npos : found - pos), ids);
    if (!token) break;
    ids.push_back(token->second);
    pos = found + token->first.size();
  }
  ids.push_back(impl_->eos_id);

  const auto max_length = static_cast<size_t>(impl_->max_length);
  if (dropped) *dropped = ids.size() > max_length ? ids.size() - max_length : 0;
  if (ids.size() > max_length) {
    ids.resize(max_length - 1);
    ids.push_back(impl_->eos_id);  // the text encoder pools at eos
  }
  ids.resize(max_length, impl_->pad_token_id);
  return ids;
}

}  // namespace lcmrt
