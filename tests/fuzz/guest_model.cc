#include "guest_model.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "fuzz_image.h"
#include "qcow2fuse/task.h"

namespace qcow2fuse::fuzz {

void GuestModel::Split(uint64_t at) {
  if (at == kEnd) return;
  auto it = std::prev(runs_.upper_bound(at));
  if (it->first == at) return;
  Run tail = it->second;
  if (tail.kind == Kind::kBytes) tail.skip += at - it->first;
  runs_.emplace(at, std::move(tail));
}

void GuestModel::Assign(uint64_t begin, uint64_t end, Run run) {
  if (begin >= end) return;
  Split(begin);
  Split(end);
  runs_.erase(runs_.find(begin), end == kEnd ? runs_.end() : runs_.find(end));
  runs_.emplace(begin, std::move(run));
}

void GuestModel::SetBytes(uint64_t offset, std::span<const uint8_t> data) {
  if (data.empty()) return;
  auto bytes = std::make_shared<const std::vector<uint8_t>>(data.begin(), data.end());
  Assign(offset, offset + data.size(), Run{Kind::kBytes, std::move(bytes), 0});
}

void GuestModel::Visit(uint64_t begin, uint64_t end,
                       const std::function<void(uint64_t, uint64_t, Kind, std::span<const uint8_t>)>& fn) const {
  if (begin >= end) return;
  for (auto it = std::prev(runs_.upper_bound(begin)); it != runs_.end() && it->first < end; ++it) {
    const uint64_t next = std::next(it) == runs_.end() ? kEnd : std::next(it)->first;
    const uint64_t from = std::max(begin, it->first);
    const uint64_t to = std::min(end, next);
    std::span<const uint8_t> bytes;
    if (it->second.kind == Kind::kBytes) {
      bytes = std::span<const uint8_t>(*it->second.bytes).subspan(it->second.skip + (from - it->first), to - from);
    }
    fn(from, to, it->second.kind, bytes);
  }
}

namespace {
constexpr uint64_t kMaxRead = uint64_t{1} << 20;
}  // namespace

void ModelComparer::Compare(const GuestModel& model, uint64_t begin, uint64_t end) {
  model.Visit(begin, end, [&](uint64_t a, uint64_t b, GuestModel::Kind kind, std::span<const uint8_t> bytes) {
    switch (kind) {
      case GuestModel::Kind::kBytes: CompareBytes(a, bytes); break;
      case GuestModel::Kind::kZero: CompareZero(a, b); break;
      case GuestModel::Kind::kOriginal: CompareOriginal(a, b); break;
      case GuestModel::Kind::kUnknown: break;
    }
  });
}

bool ModelComparer::Spend(uint64_t bytes) {
  if (steps_left_ == 0 || bytes > budget_) return false;
  --steps_left_;
  budget_ -= bytes;
  return true;
}

uint64_t ModelComparer::NonData(Qcow2Layer& layer, uint64_t offset, uint64_t max) {
  absl::StatusOr<Extent> e = SyncWait(layer.BlockStatus(offset, max));
  return e.ok() && e->kind != ExtentKind::kData ? e->length : 0;
}

std::vector<uint8_t> ModelComparer::MustRead(uint64_t offset, uint64_t length, const char* what) {
  std::vector<uint8_t> buf(length);
  absl::Status st = SyncWait(result_.Read(offset, buf));
  FUZZ_CHECK(st.ok(), absl::StrFormat("reading back %u bytes at %#x (%s): %s", length, offset, what, st.ToString()));
  return buf;
}

void ModelComparer::CompareBytes(uint64_t offset, std::span<const uint8_t> want) {
  for (uint64_t done = 0; done < want.size();) {
    const uint64_t n = std::min<uint64_t>(want.size() - done, kMaxRead);
    if (!Spend(n)) return;
    std::vector<uint8_t> got = MustRead(offset + done, n, "written");
    FUZZ_CHECK(std::equal(got.begin(), got.end(), want.begin() + done),
               absl::StrFormat("%u bytes written at %#x do not read back", n, offset + done));
    done += n;
  }
}

void ModelComparer::CompareZero(uint64_t begin, uint64_t end) {
  for (uint64_t pos = begin; pos < end;) {
    if (const uint64_t n = NonData(result_, pos, end - pos)) {
      if (!Spend(0)) return;
      pos += n;
      continue;
    }
    const uint64_t n = std::min(end - pos, kMaxRead);
    if (!Spend(n)) return;
    FUZZ_CHECK(IsAllZero(MustRead(pos, n, "zeroed")), absl::StrFormat("%u bytes at %#x should read as zeros", n, pos));
    pos += n;
  }
}

void ModelComparer::CompareOriginal(uint64_t begin, uint64_t end) {
  if (original_ == nullptr) return;
  for (uint64_t pos = begin; pos < end;) {
    const uint64_t r = NonData(result_, pos, end - pos);
    const uint64_t o = NonData(*original_, pos, end - pos);
    if (r > 0 && o > 0) {
      if (!Spend(0)) return;
      pos += std::min(r, o);
      continue;
    }
    const uint64_t n = std::min(end - pos, kMaxRead);
    if (!Spend(2 * n)) return;
    std::vector<uint8_t> was(n);
    if (SyncWait(original_->Read(pos, was)).ok()) {
      FUZZ_CHECK(MustRead(pos, n, "untouched") == was,
                 absl::StrFormat("%u bytes at %#x that no request touched have changed", n, pos));
    }
    pos += n;
  }
}

}  // namespace qcow2fuse::fuzz
