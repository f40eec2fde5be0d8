// solo_deploy: run a SOLO / Decoupled SOLO / SOLOv2 model exported to TorchScript
// (tools/export_model.py --format torchscript) on one image with libtorch, and write its
// instances as JSON, exactly as solo.export.ExportedModel computes them in Python:
//
//   solo_deploy MODEL.ts IMAGE OUTPUT.json [--threads N]
//
// Output: {"image_size": [H, W], "num_candidates": n, "instances": [{"score", "class",
// "box": [x1, y1, x2, y2], "mask": {"size": [H, W], "counts": [...]}}]}, instances in the model's
// order (descending score); boxes are the masks' tight boxes (x2, y2 exclusive); masks are
// uncompressed COCO RLE (column-major run lengths starting with a run of 0s), which
// pycocotools.mask.frPyObjects reads.
//
// Steps outside the graph, as ExportedModel does them: the image in INPUT.FORMAT as float32
// (1, 3, H, W); padding with the pixel mean for files whose graph does not pad (metadata
// version 1); the stride-4 soft masks upsampled to the padded size (bilinear, no corner
// alignment), cropped to the image and thresholded at MODEL.SOLO.MASK_THRESH.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_io.h"

namespace {

const char* kMetadataKey = "solo_export.json";

// The export metadata is JSON; solo_deploy needs a few scalar and list fields of it, whose keys
// are unique in it (the embedded config is one escaped string, so its quotes cannot match).
std::string json_field(const std::string& json, const std::string& key) {
  std::smatch match;
  std::regex pattern("\"" + key + "\"\\s*:\\s*(\\[[^\\]]*\\]|\"[^\"]*\"|[-+0-9.eE]+)");
  if (!std::regex_search(json, match, pattern)) {
    throw std::runtime_error("export metadata has no '" + key + "': re-export the model with "
                             "tools/export_model.py --format torchscript");
  }
  std::string value = match[1];
  if (value.front() == '"') value = value.substr(1, value.size() - 2);
  return value;
}

std::vector<double> json_numbers(const std::string& list) {
  std::vector<double> numbers;
  std::string cleaned = list.substr(1, list.size() - 2);
  std::stringstream in(cleaned);
  std::string item;
  while (std::getline(in, item, ',')) numbers.push_back(std::stod(item));
  return numbers;
}

struct Metadata {
  int version = 1;
  std::string input_format;
  std::vector<double> pixel_mean;
  int64_t size_divisibility = 32;
  int64_t min_blocks = 2;
  double mask_thresh = 0.5;
};

Metadata parse_metadata(const std::string& json) {
  if (json.empty()) {
    throw std::runtime_error("the file has no SOLO export metadata (" + std::string(kMetadataKey) +
                             "): export it with tools/export_model.py --format torchscript");
  }
  Metadata meta;
  meta.version = std::stoi(json_field(json, "version"));
  meta.input_format = json_field(json, "input_format");
  meta.mask_thresh = std::stod(json_field(json, "mask_thresh"));
  if (meta.version < 2) {  // the runtime pads: it needs the padding's parameters
    meta.pixel_mean = json_numbers(json_field(json, "pixel_mean"));
    meta.size_divisibility = std::stoll(json_field(json, "size_divisibility"));
    meta.min_blocks = std::stoll(json_field(json, "min_blocks"));
  }
  return meta;
}

// (1, 3, H, W) float32 in INPUT.FORMAT ("RGB" or "BGR") from an RGB image.
torch::Tensor to_model_input(const RgbImage& image, const std::string& input_format) {
  auto hwc = torch::from_blob(const_cast<uint8_t*>(image.pixels.data()),
                              {image.height, image.width, 3}, torch::kUInt8);
  auto chw = hwc.permute({2, 0, 1}).to(torch::kFloat32);
  if (input_format == "BGR") {
    chw = chw.flip({0});
  } else if (input_format != "RGB") {
    throw std::runtime_error("INPUT.FORMAT '" + input_format + "' is not supported (RGB, BGR)");
  }
  return chw.unsqueeze(0).contiguous();
}

// solo.export.runtime.pad_image: bottom/right padding with the pixel mean (metadata version 1).
torch::Tensor pad_with_mean(const torch::Tensor& image, const Metadata& meta) {
  int64_t h = image.size(2), w = image.size(3), d = meta.size_divisibility;
  int64_t hp = std::max((h + d - 1) / d * d, meta.min_blocks * d);
  int64_t wp = std::max((w + d - 1) / d * d, meta.min_blocks * d);
  auto mean = torch::tensor(std::vector<float>(meta.pixel_mean.begin(), meta.pixel_mean.end()));
  auto padded = mean.reshape({1, 3, 1, 1}).expand({1, 3, hp, wp}).clone();
  padded.index_put_({torch::indexing::Slice(), torch::indexing::Slice(),
                     torch::indexing::Slice(0, h), torch::indexing::Slice(0, w)},
                    image);
  return padded;
}

// Uncompressed COCO RLE of a (H, W) bool mask: runs over the column-major pixels, starting with 0s.
std::vector<int64_t> rle_counts(const torch::Tensor& mask) {
  auto column_major = mask.t().contiguous();
  const bool* data = column_major.data_ptr<bool>();
  std::vector<int64_t> counts;
  bool current = false;
  int64_t run = 0;
  for (int64_t i = 0, n = column_major.numel(); i < n; ++i) {
    if (data[i] != current) {
      counts.push_back(run);
      run = 0;
      current = data[i];
    }
    ++run;
  }
  counts.push_back(run);
  return counts;
}

// solo.modeling.paste.masks_to_boxes for one mask: tight XYXY box, x2/y2 exclusive, zeros if empty.
std::vector<int64_t> mask_box(const torch::Tensor& mask) {
  auto cols = mask.any(0), rows = mask.any(1);
  if (!cols.any().item<bool>()) return {0, 0, 0, 0};
  auto xs = cols.nonzero(), ys = rows.nonzero();
  return {xs.min().item<int64_t>(), ys.min().item<int64_t>(), xs.max().item<int64_t>() + 1,
          ys.max().item<int64_t>() + 1};
}

void write_json(const std::string& path, int64_t height, int64_t width, int64_t num_candidates,
                const torch::Tensor& scores, const torch::Tensor& labels,
                const torch::Tensor& masks) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error(path + ": cannot write");
  char number[32];
  out << "{\"image_size\": [" << height << ", " << width << "], \"num_candidates\": "
      << num_candidates << ", \"instances\": [";
  for (int64_t i = 0; i < scores.size(0); ++i) {
    auto box = mask_box(masks[i]);
    std::snprintf(number, sizeof(number), "%.9g", scores[i].item<float>());
    out << (i ? ", " : "") << "{\"score\": " << number
        << ", \"class\": " << labels[i].item<int64_t>() << ", \"box\": [" << box[0] << ", "
        << box[1] << ", " << box[2] << ", " << box[3] << "], \"mask\": {\"size\": [" << height
        << ", " << width << "], \"counts\": [";
    auto counts = rle_counts(masks[i]);
    for (size_t j = 0; j < counts.size(); ++j) out << (j ? ", " : "") << counts[j];
    out << "]}}";
  }
  out << "]}\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && !(argc == 6 && std::string(argv[4]) == "--threads")) {
    std::cerr << "usage: solo_deploy MODEL.ts IMAGE OUTPUT.json [--threads N]\n"
                 "  IMAGE: .ppm (P6), or .jpg/.png when built with libjpeg/libpng\n";
    return 2;
  }
  try {
    if (argc == 6) at::set_num_threads(std::stoi(argv[5]));
    torch::jit::ExtraFilesMap extra{{kMetadataKey, ""}};
    auto module = torch::jit::load(argv[1], torch::kCPU, extra);
    module.eval();
    Metadata meta = parse_metadata(extra[kMetadataKey]);

    RgbImage image = read_rgb_image(argv[2]);
    torch::Tensor input = to_model_input(image, meta.input_format);
    if (meta.version < 2) input = pad_with_mean(input, meta);

    torch::NoGradGuard no_grad;
    auto outputs = module.forward({input}).toTuple()->elements();
    auto scores = outputs[0].toTensor(), labels = outputs[1].toTensor();
    auto soft_masks = outputs[2].toTensor();
    int64_t num_det = outputs[3].toTensor().item<int64_t>();
    int64_t num_cand = outputs[4].toTensor().item<int64_t>();

    // Masks at stride 4 of the padded input: upsample to it, crop to the image, threshold.
    int64_t padded_h = soft_masks.size(1) * 4, padded_w = soft_masks.size(2) * 4;
    auto probs = soft_masks.slice(0, 0, num_det).unsqueeze(0);
    auto upsampled = at::upsample_bilinear2d(probs, {padded_h, padded_w}, false);
    auto cropped = upsampled[0].slice(1, 0, image.height).slice(2, 0, image.width);
    auto masks = cropped.gt(meta.mask_thresh).contiguous();

    write_json(argv[3], image.height, image.width, num_cand, scores.slice(0, 0, num_det),
               labels.slice(0, 0, num_det), masks);
    std::cout << argv[3] << ": " << num_det << " instances\n";
  } catch (const std::exception& e) {
    std::cerr << "solo_deploy: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
