#include "image_io.h"

#include <cctype>
#include <cstdio>
#include <fstream>
#include <memory>
#include <stdexcept>

#ifdef SOLO_WITH_JPEG
#include <jpeglib.h>
#endif
#ifdef SOLO_WITH_PNG
#include <png.h>
#endif

namespace {

std::runtime_error image_error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

// Next header token of a PPM file, skipping whitespace and '#' comments.
std::string ppm_token(std::istream& in) {
  std::string token;
  char c;
  while (in.get(c)) {
    if (c == '#') {
      std::string comment;
      std::getline(in, comment);
    } else if (std::isspace(static_cast<unsigned char>(c))) {
      if (!token.empty()) return token;
    } else {
      token += c;
    }
  }
  return token;
}

RgbImage read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw image_error(path, "cannot open");
  if (ppm_token(in) != "P6") throw image_error(path, "not a binary PPM (P6) file");
  RgbImage image;
  image.width = std::stoi(ppm_token(in));
  image.height = std::stoi(ppm_token(in));
  if (std::stoi(ppm_token(in)) != 255) throw image_error(path, "only 8-bit PPM (maxval 255)");
  image.pixels.resize(static_cast<size_t>(image.height) * image.width * 3);
  in.read(reinterpret_cast<char*>(image.pixels.data()), image.pixels.size());
  if (in.gcount() != static_cast<std::streamsize>(image.pixels.size())) {
    throw image_error(path, "truncated PPM data");
  }
  return image;
}

#ifdef SOLO_WITH_JPEG
RgbImage read_jpeg(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw image_error(path, "cannot open");
  jpeg_decompress_struct info;
  jpeg_error_mgr errors;
  info.err = jpeg_std_error(&errors);
  errors.error_exit = [](j_common_ptr) { throw std::runtime_error("corrupt JPEG data"); };
  jpeg_create_decompress(&info);
  RgbImage image;
  try {
    jpeg_stdio_src(&info, file.get());
    jpeg_read_header(&info, TRUE);
    info.out_color_space = JCS_RGB;
    jpeg_start_decompress(&info);
    image.height = info.output_height;
    image.width = info.output_width;
    image.pixels.resize(static_cast<size_t>(image.height) * image.width * 3);
    while (info.output_scanline < info.output_height) {
      JSAMPROW row = image.pixels.data() + static_cast<size_t>(info.output_scanline) * image.width * 3;
      jpeg_read_scanlines(&info, &row, 1);
    }
    jpeg_finish_decompress(&info);
  } catch (const std::runtime_error& e) {
    jpeg_destroy_decompress(&info);
    throw image_error(path, e.what());
  }
  jpeg_destroy_decompress(&info);
  return image;
}
#endif

#ifdef SOLO_WITH_PNG
RgbImage read_png(const std::string& path) {
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&png, path.c_str())) throw image_error(path, png.message);
  png.format = PNG_FORMAT_RGB;  // 16-bit, palette, grey and alpha converted by libpng
  RgbImage image;
  image.height = png.height;
  image.width = png.width;
  image.pixels.resize(PNG_IMAGE_SIZE(png));
  if (!png_image_finish_read(&png, nullptr, image.pixels.data(), 0, nullptr)) {
    throw image_error(path, png.message);
  }
  return image;
}
#endif

bool has_suffix(const std::string& path, const std::string& suffix) {
  if (path.size() < suffix.size()) return false;
  std::string tail = path.substr(path.size() - suffix.size());
  for (auto& c : tail) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return tail == suffix;
}

}  // namespace

RgbImage read_rgb_image(const std::string& path) {
  if (has_suffix(path, ".ppm")) return read_ppm(path);
  if (has_suffix(path, ".jpg") || has_suffix(path, ".jpeg")) {
#ifdef SOLO_WITH_JPEG
    return read_jpeg(path);
#else
    throw image_error(path, "built without libjpeg: install it and rebuild, or convert to PPM");
#endif
  }
  if (has_suffix(path, ".png")) {
#ifdef SOLO_WITH_PNG
    return read_png(path);
#else
    throw image_error(path, "built without libpng: install it and rebuild, or convert to PPM");
#endif
  }
  throw image_error(path, "unknown image type; expected .ppm, .jpg/.jpeg or .png");
}
