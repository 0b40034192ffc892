/* An LD_PRELOAD library that makes uname() report the kernel release in
 * QCOW2FUSE_TEST_KERNEL_RELEASE, so that a test can run the daemon as it
 * would run on a kernel this machine does not have (opener.h: the loop
 * driver before Linux 6.15). Without the variable it changes nothing.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>

int uname(struct utsname* name) {
  int (*next)(struct utsname*) = (int (*)(struct utsname*))dlsym(RTLD_NEXT, "uname");
  if (next == NULL) return -1;
  const int result = next(name);
  const char* release = getenv("QCOW2FUSE_TEST_KERNEL_RELEASE");
  if (result == 0 && release != NULL) {
    strncpy(name->release, release, sizeof name->release - 1);
    name->release[sizeof name->release - 1] = '\0';
  }
  return result;
}
