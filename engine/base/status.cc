#include <cstring>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {
constexpr char kErrnoPayloadUrl[] = "qcow2fuse/errno";
constexpr char kBackingPayloadUrl[] = "qcow2fuse/backing";
}  // namespace

absl::Status FromBackingFile(absl::Status status) {
  if (!status.ok()) status.SetPayload(kBackingPayloadUrl, absl::Cord("1"));
  return status;
}

bool IsFromBackingFile(const absl::Status& status) {
  return status.GetPayload(kBackingPayloadUrl).has_value();
}

absl::Status ErrnoStatus(int error_number, absl::string_view context) {
  absl::Status status(absl::ErrnoToStatusCode(error_number),
                      absl::StrCat(context, ": ", std::strerror(error_number)));
  status.SetPayload(kErrnoPayloadUrl, absl::Cord(std::to_string(error_number)));
  return status;
}

absl::Status WithErrno(absl::Status status, int error_number) {
  status.SetPayload(kErrnoPayloadUrl, absl::Cord(std::to_string(error_number)));
  return status;
}

std::optional<int> StatusErrno(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kErrnoPayloadUrl);
  int value;
  if (!payload || !absl::SimpleAtoi(std::string(*payload), &value)) return std::nullopt;
  return value;
}

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  absl::Status annotated(status.code(), absl::StrCat(context, ": ", status.message()));
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
    annotated.SetPayload(url, payload);
  });
  return annotated;
}

}  // namespace qcow2fuse
