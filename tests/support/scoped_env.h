// ScopedEnv: sets an environment variable for the life of the object, and
// puts the old value back. A daemon that a test starts meanwhile inherits
// it (an LD_PRELOAD shim, the shim's control file). ScopedPreload: a shim.

#ifndef QCOW2FUSE_TESTS_SUPPORT_SCOPED_ENV_H_
#define QCOW2FUSE_TESTS_SUPPORT_SCOPED_ENV_H_

#include <stdlib.h>

#include <optional>
#include <string>

namespace qcow2fuse::test {

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

  const std::optional<std::string>& old() const { return old_; }

 private:
  const char* const name_;
  std::optional<std::string> old_;
};

// For a daemon that is meant to exit with threads still running (its
// drain_timeout gave up on a stuck request): ThreadSanitizer would report
// the threads it leaves as leaks, and exit with its own code. Other reports
// stay on.
class ScopedThreadLeaksAllowed {
 public:
  ScopedThreadLeaksAllowed() : tsan_options_("TSAN_OPTIONS", WithLeaksAllowed()) {}

 private:
  static std::string WithLeaksAllowed() {
    const char* options = getenv("TSAN_OPTIONS");
    return options == nullptr ? "report_thread_leaks=0" : std::string(options) + ":report_thread_leaks=0";
  }

  ScopedEnv tsan_options_;
};

// Preloads `library` (LD_PRELOAD) into the processes started during the
// object's life, such as a daemon under test with a shim. The library then
// comes before a sanitizer's runtime in the library list, which
// AddressSanitizer refuses unless told otherwise, so ASAN_OPTIONS says so.
class ScopedPreload {
 public:
  explicit ScopedPreload(const std::string& library)
      : asan_options_("ASAN_OPTIONS", WithoutLinkOrderCheck()), preload_("LD_PRELOAD", library) {}

 private:
  static std::string WithoutLinkOrderCheck() {
    const char* options = getenv("ASAN_OPTIONS");
    return options == nullptr ? "verify_asan_link_order=0" : std::string(options) + ":verify_asan_link_order=0";
  }

  ScopedEnv asan_options_;
  ScopedEnv preload_;
};

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_SCOPED_ENV_H_
