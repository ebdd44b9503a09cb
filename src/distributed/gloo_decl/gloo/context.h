#pragma once
#include <chrono>

namespace gloo {
// Owned by libtorch; named by ProcessGroupGloo::setTimeout's inline body.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
