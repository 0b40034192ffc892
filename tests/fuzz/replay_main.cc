// A main() for a fuzz target built without libFuzzer: feeds it every file
// named on the command line and every file of every directory named, in
// name order. ctest runs it over tests/fuzz/regressions/<target>/ in the
// normal, sanitizer and ThreadSanitizer builds, so an input that once
// crashed a target keeps being tried by every build, not only by the
// clang fuzzing build.
//
// A target reports a broken invariant by aborting, so a failure shows as
// a crash right after the line naming the input. With QCOW2FUSE_TEST_OPS
// set (the ThreadSanitizer run), a directory given after --sample (a
// generated corpus) is sampled: a quarter that many of its files are run
// (a write_fuzzer seed holds several requests), spread over it.
// Regression directories are always run whole.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<std::string> FilesOf(const std::string& path) {
  std::vector<std::string> files;
  if (!std::filesystem::is_directory(path)) return {path};
  for (const auto& entry : std::filesystem::directory_iterator(path)) {
    if (entry.is_regular_file() && entry.path().filename().string()[0] != '.') {
      files.push_back(entry.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

uint64_t SampleLimit() {
  uint64_t ops = 0;
  const char* text = std::getenv("QCOW2FUSE_TEST_OPS");
  return text != nullptr && absl::SimpleAtoi(text, &ops) && ops > 0 ? std::max<uint64_t>(ops / 4, 1) : UINT64_MAX;
}

}  // namespace

int main(int argc, char** argv) {
  bool sample = false;
  uint64_t run = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--sample") {
      sample = true;
      continue;
    }
    if (!std::filesystem::exists(arg)) {
      std::fprintf(stderr, "%s: no such file or directory\n", arg.c_str());
      return 2;
    }
    std::vector<std::string> files = FilesOf(arg);
    const uint64_t limit = sample ? SampleLimit() : UINT64_MAX;
    const uint64_t stride = files.size() > limit ? (files.size() + limit - 1) / limit : 1;
    for (size_t f = 0; f < files.size(); f += stride) {
      std::ifstream in(files[f], std::ios::binary | std::ios::ate);
      std::vector<uint8_t> bytes(in ? static_cast<size_t>(in.tellg()) : 0);
      in.seekg(0);
      if (!in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()))) {
        std::fprintf(stderr, "%s: cannot read\n", files[f].c_str());
        return 2;
      }
      std::printf("%s (%zu bytes)\n", files[f].c_str(), bytes.size());
      std::fflush(stdout);
      LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
      ++run;
    }
  }
  std::printf("%llu inputs passed\n", static_cast<unsigned long long>(run));
  return 0;
}
