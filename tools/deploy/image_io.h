// Reading 8-bit RGB images for solo_deploy: PPM (P6, always), JPEG and PNG (when built with
// libjpeg / libpng).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct RgbImage {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> pixels;  // height * width * 3, row-major, RGB
};

// Throws std::runtime_error naming the file and what is wrong with it.
RgbImage read_rgb_image(const std::string& path);
