// ScopedEnv: sets an environment variable for the life of the object, and
// puts the old value back. A daemon that a test starts meanwhile inherits
// it (an LD_PRELOAD shim, the shim's control file).

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

}  // namespace qcow2fuse::test

#endif  // QCOW2FUSE_TESTS_SUPPORT_SCOPED_ENV_H_
