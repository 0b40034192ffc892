#include "meta/header_writer.h"

#include "absl/strings/str_format.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {

Task<absl::Status> HeaderWriter::Switch(uint64_t offset, std::span<const uint8_t> now,
                                        std::span<const uint8_t> before) {
  CO_RETURN_IF_ERROR(co_await Settle());
  absl::Status status = co_await file_->Write(offset, now);
  // After a failed barrier the new bytes may or may not be on the disk;
  // the old ones are what the caller's state matches.
  if (status.ok()) status = co_await file_->Flush();
  if (!status.ok()) co_return co_await Undo(offset, before, std::move(status));
  co_return absl::OkStatus();
}

Task<absl::Status> HeaderWriter::Undo(uint64_t offset, std::span<const uint8_t> before, absl::Status failure) {
  absl::Status restored = co_await file_->Write(offset, before);
  if (restored.ok()) co_return failure;
  pending_ = Restore{offset, std::vector<uint8_t>(before.begin(), before.end())};
  co_return Annotate(failure, absl::StrFormat("the header of %s at %u..%u is half-written: writing its old bytes back "
                                              "failed too (%s), and every flush retries it",
                                              file_->name(), offset, offset + before.size(), restored.message()));
}

Task<absl::Status> HeaderWriter::Settle() {
  if (!pending_) co_return absl::OkStatus();
  absl::Status restored = co_await file_->Write(pending_->offset, pending_->bytes);
  if (!restored.ok()) {
    co_return Annotate(restored, absl::StrFormat("the header of %s is half-written at %u..%u and cannot be "
                                                 "restored",
                                                 file_->name(), pending_->offset,
                                                 pending_->offset + pending_->bytes.size()));
  }
  pending_.reset();
  co_return absl::OkStatus();
}

}  // namespace qcow2fuse
