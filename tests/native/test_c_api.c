/* The C API from C (C11): lcmrt.h compiles as C, and a C program loads a folder, generates, reads pixels, writes a PNG
 * and gets status codes with messages for bad input.   test_c_api FOLDER OUT.png */
#include <stdio.h>
#include <string.h>

#include "lcmrt/lcmrt.h"

static int failures = 0;
#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      ++failures;                                                       \
      fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
    }                                                                   \
  } while (0)

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  lcmrt_pipeline* pipeline = NULL;
  EXPECT(lcmrt_pipeline_load("/nonexistent", NULL, &pipeline) == LCMRT_ERROR_ENGINE_FOLDER);
  EXPECT(pipeline == NULL && strstr(lcmrt_last_error(), "is not a folder") != NULL);
  lcmrt_load_options options = {1};
  if (lcmrt_pipeline_load(argv[1], &options, &pipeline) != LCMRT_OK) {
    fprintf(stderr, "load failed: %s\n", lcmrt_last_error());
    return 1;
  }
  lcmrt_request request;
  lcmrt_request_init(&request);
  request.prompt = "a watercolor fox in the snow";
  request.steps = 2;
  request.seed = 42;
  lcmrt_images* images = NULL;
  EXPECT(lcmrt_generate(pipeline, &request, &images) == LCMRT_OK);
  EXPECT(lcmrt_images_count(images) == 1 && lcmrt_images_height(images) == 128 && lcmrt_images_width(images) == 128);
  const float* pixels = lcmrt_images_pixels(images, 0);
  EXPECT(pixels != NULL && pixels[0] >= 0.0f && pixels[0] <= 1.0f);
  EXPECT(lcmrt_images_save_png(images, 0, argv[2]) == LCMRT_OK);
  double total = 0;
  EXPECT(lcmrt_images_timings(images, NULL, NULL, NULL, &total) == LCMRT_OK && total > 0);
  lcmrt_images_free(images);
  request.steps = 0;
  images = NULL;
  EXPECT(lcmrt_generate(pipeline, &request, &images) == LCMRT_ERROR_GENERATION && images == NULL);
  EXPECT(strstr(lcmrt_last_error(), "num_inference_steps=0") != NULL);
  EXPECT(strcmp(lcmrt_status_name(LCMRT_ERROR_ADAPTER), "adapter error") == 0);
  const char* names[] = {"nope"};
  const double weights[] = {1.0};
  EXPECT(lcmrt_set_adapters(pipeline, names, weights, 1) == LCMRT_ERROR_ADAPTER);
  EXPECT(lcmrt_adapter_count(pipeline) == 2);
  lcmrt_pipeline_free(pipeline);
  if (failures) fprintf(stderr, "%d expectation(s) failed\n", failures);
  return failures ? 1 : 0;
}
