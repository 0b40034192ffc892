#include "support/qemu.h"

#include "absl/strings/str_format.h"

#include <signal.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <regex>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "support/command.h"
#include "support/temp_dir.h"

namespace qcow2fuse::test {
namespace {

// Returns the JSON value of "key" in a flat object, as text, or nullopt.
// A plain scan, not std::regex: tests call this from several threads at
// once, and compiling a regex touches the shared locale's caches, which
// ThreadSanitizer reports as a race.
std::optional<std::string> FieldText(const std::string& object,
                                     const std::string& key) {
  const std::string quoted = "\"" + key + "\"";
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  for (size_t at = object.find(quoted); at != std::string::npos;
       at = object.find(quoted, at + 1)) {
    size_t i = at + quoted.size();
    while (i < object.size() && is_space(object[i])) ++i;
    if (i == object.size() || object[i] != ':') continue;
    ++i;
    while (i < object.size() && is_space(object[i])) ++i;
    const size_t begin = i;
    while (i < object.size() && object[i] != ',' && object[i] != '}' && !is_space(object[i])) ++i;
    if (i == begin) return std::nullopt;
    return object.substr(begin, i - begin);
  }
  return std::nullopt;
}

absl::StatusOr<uint64_t> NumberField(const std::string& object,
                                     const std::string& key) {
  std::optional<std::string> text = FieldText(object, key);
  uint64_t value = 0;
  if (!text || !absl::SimpleAtoi(*text, &value)) {
    return absl::InvalidArgumentError(
        absl::StrCat("no numeric \"", key, "\" in map entry: ", object));
  }
  return value;
}

absl::StatusOr<bool> BoolField(const std::string& object,
                               const std::string& key) {
  std::optional<std::string> text = FieldText(object, key);
  if (text == "true") return true;
  if (text == "false") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("no boolean \"", key, "\" in map entry: ", object));
}

absl::StatusOr<MapExtent> ParseMapObject(const std::string& object) {
  MapExtent extent;
  absl::StatusOr<uint64_t> start = NumberField(object, "start");
  absl::StatusOr<uint64_t> length = NumberField(object, "length");
  absl::StatusOr<uint64_t> depth = NumberField(object, "depth");
  absl::StatusOr<bool> zero = BoolField(object, "zero");
  absl::StatusOr<bool> data = BoolField(object, "data");
  for (const absl::Status& s : {start.status(), length.status(), depth.status(),
                                zero.status(), data.status()}) {
    if (!s.ok()) return s;
  }
  extent.start = *start;
  extent.length = *length;
  extent.depth = static_cast<int>(*depth);
  extent.zero = *zero;
  extent.data = *data;
  // "present" appeared in QEMU 6.x; older output implies it from depth.
  absl::StatusOr<bool> present = BoolField(object, "present");
  extent.present = present.ok() ? *present : extent.data;
  if (FieldText(object, "offset")) {
    absl::StatusOr<uint64_t> offset = NumberField(object, "offset");
    if (!offset.ok()) return offset.status();
    extent.offset = *offset;
  }
  return extent;
}

}  // namespace

absl::Status CreateImage(const std::string& path, absl::string_view format,
                         uint64_t size,
                         const std::vector<std::string>& options) {
  std::vector<std::string> argv = {"qemu-img", "create", "-q", "-f",
                                   std::string(format)};
  if (!options.empty()) {
    argv.push_back("-o");
    argv.push_back(absl::StrJoin(options, ","));
  }
  argv.push_back(path);
  argv.push_back(absl::StrCat(size));
  return RunChecked(argv).status();
}

absl::Status QemuIo(const std::string& path, absl::string_view format,
                    const std::vector<std::string>& commands) {
  std::vector<std::string> argv = {"qemu-io", "-f", std::string(format)};
  for (const std::string& command : commands) {
    argv.push_back("-c");
    argv.push_back(command);
  }
  argv.push_back(path);
  return RunChecked(argv).status();
}

absl::StatusOr<std::string> QemuImg(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"qemu-img"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunChecked(argv);
}

absl::Status CreateLuksImage(const std::string& path, const std::string& secret, const std::string& options,
                             const std::string& size) {
  // Five quick attempts all failed once in a full run: the attempts are
  // spread over a few seconds, so that a moment of the machine's load
  // passes.
  absl::Status status;
  for (int attempt = 0; attempt < 20; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100 * attempt));
    status = QemuImg({"create", "-q", "-f", "qcow2", "--object", secret, "-o", options, path, size}).status();
    if (!absl::StrContains(status.message(), "Unable to get accurate CPU usage")) break;
  }
  return status;
}

absl::Status ConvertImage(const std::string& src, absl::string_view src_format,
                          const std::string& dst, absl::string_view dst_format,
                          const std::vector<std::string>& extra) {
  std::vector<std::string> args = {"convert", "-f", std::string(src_format),
                                   "-O", std::string(dst_format)};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(src);
  args.push_back(dst);
  return QemuImg(args).status();
}

absl::Status ConvertToRaw(const std::string& qcow2, const std::string& raw) {
  return ConvertImage(qcow2, "qcow2", raw, "raw");
}

absl::Status CheckImage(const std::string& path, bool allow_leaks,
                        const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {"qemu-img", "check", "-f", "qcow2"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(path);
  absl::StatusOr<CommandResult> result = RunCommand(argv);
  if (!result.ok()) return result.status();
  if (result->ok()) return absl::OkStatus();
  if (allow_leaks && result->status.exited() && result->status.code() == 3) {
    return absl::OkStatus();
  }
  return absl::InternalError(absl::StrCat(
      "qemu-img check failed (", result->status.ToString(), "): ",
      CommandLine(argv), "\n", result->stdout_text, result->stderr_text));
}

absl::StatusOr<QemuCheckReport> QemuCheck(
    const std::string& path, const std::vector<std::string>& target) {
  std::vector<std::string> argv = {"qemu-img", "check", "--output=json"};
  if (target.empty()) {
    argv.insert(argv.end(), {"-f", "qcow2", path});
  } else {
    argv.insert(argv.end(), target.begin(), target.end());
  }
  absl::StatusOr<CommandResult> result = RunCommand(argv);
  if (!result.ok()) return result.status();
  QemuCheckReport report;
  report.output = result->stdout_text + result->stderr_text;
  if (!result->status.exited() || result->status.code() > 3) {
    return absl::InternalError(absl::StrCat(
        "qemu-img check failed (", result->status.ToString(), "): ",
        CommandLine(argv), "\n", report.output));
  }
  report.exit_code = result->status.code();
  // QEMU always prints "check-errors"; without it qemu-img could not open
  // the image at all (exit code 1, a message on stderr): that is no report
  // of a clean image.
  if (!FieldText(result->stdout_text, "check-errors")) {
    return absl::InternalError(absl::StrCat("qemu-img check gave no report (",
                                            result->status.ToString(), "): ",
                                            CommandLine(argv), "\n", report.output));
  }
  for (auto [key, count] : {std::pair{"corruptions", &report.corruptions},
                            std::pair{"leaks", &report.leaks},
                            std::pair{"check-errors", &report.check_errors}}) {
    std::optional<std::string> text = FieldText(result->stdout_text, key);
    if (text && !absl::SimpleAtoi(*text, count)) {
      return absl::InternalError(
          absl::StrCat("bad \"", key, "\" in qemu-img check: ", report.output));
    }
  }
  return report;
}

absl::StatusOr<uint64_t> VirtualSize(const std::string& path,
                                     absl::string_view format) {
  absl::StatusOr<std::string> info =
      QemuImg({"info", "-f", std::string(format), "--output=json", path});
  if (!info.ok()) return info.status();
  std::smatch match;
  static const std::regex kVirtualSize("\"virtual-size\"\\s*:\\s*(\\d+)");
  uint64_t size = 0;
  if (!std::regex_search(*info, match, kVirtualSize) ||
      !absl::SimpleAtoi(match[1].str(), &size)) {
    return absl::InternalError(
        absl::StrCat("no virtual-size in qemu-img info output: ", *info));
  }
  return size;
}

absl::StatusOr<std::vector<MapExtent>> MapImage(const std::string& path) {
  absl::StatusOr<std::string> json =
      QemuImg({"map", "--output=json", "-f", "qcow2", path});
  if (!json.ok()) return json.status();
  return ParseMapJson(*json);
}

absl::StatusOr<std::vector<MapExtent>> ParseMapJson(absl::string_view json) {
  // The output is a flat array of flat objects: no nesting, so every
  // object is exactly a {...} run without braces inside.
  static const std::regex kObject("\\{[^{}]*\\}");
  std::string text(json);
  std::vector<MapExtent> extents;
  for (std::sregex_iterator it(text.begin(), text.end(), kObject), end;
       it != end; ++it) {
    absl::StatusOr<MapExtent> extent = ParseMapObject(it->str());
    if (!extent.ok()) return extent.status();
    extents.push_back(*extent);
  }
  if (extents.empty() && text.find('{') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot parse qemu-img map output: ", text));
  }
  return extents;
}

absl::StatusOr<std::vector<BitmapInfo>> ImageBitmaps(const std::string& path, bool force_share) {
  std::vector<std::string> args = {"info", "-f", "qcow2", "--output=json"};
  if (force_share) args.push_back("-U");
  args.push_back(path);
  absl::StatusOr<std::string> info = QemuImg(args);
  if (!info.ok()) return info.status();
  std::vector<BitmapInfo> bitmaps;
  const size_t key = info->find("\"bitmaps\"");
  if (key == std::string::npos) return bitmaps;
  const size_t open = info->find('[', key);
  if (open == std::string::npos) {
    return absl::InternalError(absl::StrCat("cannot parse the bitmaps of qemu-img info: ", *info));
  }
  // The array of objects, each with a "flags" array inside: find its end
  // by depth.
  size_t close = open;
  for (int depth = 0; close < info->size(); ++close) {
    if ((*info)[close] == '[') ++depth;
    if ((*info)[close] == ']' && --depth == 0) break;
  }
  const std::string array = info->substr(open, close - open + 1);
  for (size_t begin = array.find('{'); begin != std::string::npos;
       begin = array.find('{', begin + 1)) {
    const size_t end = array.find('}', begin);
    if (end == std::string::npos) break;
    const std::string object = array.substr(begin, end - begin + 1);
    BitmapInfo b;
    const size_t name_key = object.find("\"name\"");
    const size_t quote = name_key == std::string::npos ? name_key : object.find('"', object.find(':', name_key));
    const size_t quote_end = quote == std::string::npos ? quote : object.find('"', quote + 1);
    absl::StatusOr<uint64_t> granularity = NumberField(object, "granularity");
    const size_t flags_key = object.find("\"flags\"");
    if (quote_end == std::string::npos || !granularity.ok() || flags_key == std::string::npos) {
      return absl::InternalError(absl::StrCat("cannot parse a bitmap of qemu-img info: ", object));
    }
    b.name = object.substr(quote + 1, quote_end - quote - 1);
    b.granularity = *granularity;
    const std::string flags =
        object.substr(flags_key, object.find(']', flags_key) - flags_key);
    b.in_use = absl::StrContains(flags, "\"in-use\"");
    b.enabled = absl::StrContains(flags, "\"auto\"");
    bitmaps.push_back(std::move(b));
  }
  return bitmaps;
}

absl::StatusOr<std::vector<ByteRange>> DirtyExtents(const std::string& path,
                                                    const std::string& name) {
  absl::StatusOr<TempDir> dir = TempDir::Create("nbd");
  if (!dir.ok()) return dir.status();
  const std::string socket = dir->Join("nbd.sock");
  const std::string log = dir->Join("qemu-nbd.log");
  const int log_fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (log_fd < 0) return absl::InternalError(absl::StrCat("open ", log, ": ", strerror(errno)));
  // Without --persistent, qemu-nbd exits once its one client has gone.
  const std::vector<std::string> server = {"qemu-nbd", "-k", socket, "-f", "qcow2", "-r", "-B", name, path};
  absl::StatusOr<pid_t> pid = Spawn(server, log_fd, log_fd);
  close(log_fd);
  if (!pid.ok()) return pid.status();
  auto log_text = [&] {
    std::string text;
    if (FILE* f = fopen(log.c_str(), "r")) {
      char buffer[4096];
      size_t n;
      while ((n = fread(buffer, 1, sizeof buffer, f)) > 0) text.append(buffer, n);
      fclose(f);
    }
    return text;
  };
  // Reaps qemu-nbd: it has exited (the client went), or is stopped now.
  auto reap = [&]() -> absl::Status {
    absl::StatusOr<std::optional<ExitStatus>> exited = WaitForExitFor(*pid, std::chrono::seconds(10));
    if (!exited.ok()) return exited.status();
    if (exited->has_value()) return absl::OkStatus();
    kill(*pid, SIGTERM);
    return WaitForExit(*pid).status();
  };
  // Serving once the socket exists; a qemu-nbd that exits first failed.
  struct stat st;
  for (int waited_ms = 0; stat(socket.c_str(), &st) != 0; waited_ms += 10) {
    absl::StatusOr<std::optional<ExitStatus>> exited = WaitForExitFor(*pid, std::chrono::milliseconds(10));
    if (!exited.ok()) return exited.status();
    if (exited->has_value()) {
      return absl::InternalError(absl::StrCat(CommandLine(server), " exited (", (*exited)->ToString(),
                                              "): ", log_text()));
    }
    if (waited_ms > 60000) {
      absl::Status reaped = reap();
      return absl::InternalError(absl::StrCat(CommandLine(server), " made no socket in 60 s: ", log_text(),
                                              reaped.ok() ? "" : reaped.ToString()));
    }
  }
  // The socket exists from qemu-nbd's bind on, but connections are refused
  // until its listen: under load, a few milliseconds later.
  absl::StatusOr<CommandResult> map;
  for (int tries = 0;; ++tries) {
    map = RunCommand({"nbdinfo", "--map=qemu:dirty-bitmap:" + name, "nbd+unix:///?socket=" + socket});
    if (!map.ok() || map->ok() || tries == 500 || !absl::StrContains(map->stderr_text, "Connection refused")) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const absl::Status reaped = reap();
  if (!map.ok()) return map.status();
  if (!map->ok()) {
    return absl::InternalError(absl::StrCat("nbdinfo --map=qemu:dirty-bitmap:", name, " failed (",
                                            map->status.ToString(), "): ", map->stderr_text, "\n", log_text()));
  }
  if (!reaped.ok()) return reaped;
  // Lines of "offset length type description"; type 1 is dirty.
  std::vector<ByteRange> dirty;
  for (absl::string_view line : absl::StrSplit(map->stdout_text, '\n', absl::SkipWhitespace())) {
    std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
    uint64_t offset = 0, length = 0, type = 0;
    if (fields.size() < 3 || !absl::SimpleAtoi(fields[0], &offset) || !absl::SimpleAtoi(fields[1], &length) ||
        !absl::SimpleAtoi(fields[2], &type)) {
      return absl::InternalError(absl::StrCat("cannot parse nbdinfo's map: ", map->stdout_text));
    }
    if (type != 1) continue;
    if (!dirty.empty() && dirty.back().end() == offset) {
      dirty.back().length += length;
    } else {
      dirty.push_back({offset, length});
    }
  }
  return dirty;
}

namespace qemu_io_cmd {
std::string W(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -P 0x%02x %d %d", pattern, offset, length);
}
std::string Zero(uint64_t offset, uint64_t length, bool unmap) {
  return absl::StrFormat("write -z%s %d %d", unmap ? " -u" : "", offset, length);
}
std::string Discard(uint64_t offset, uint64_t length) {
  return absl::StrFormat("discard %d %d", offset, length);
}
std::string Compressed(int pattern, uint64_t offset, uint64_t length) {
  return absl::StrFormat("write -c -P 0x%02x %d %d", pattern, offset, length);
}
}  // namespace qemu_io_cmd

}  // namespace qcow2fuse::test
