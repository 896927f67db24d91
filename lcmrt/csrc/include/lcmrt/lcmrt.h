/* lcmrt's native runtime, C API: load an engine folder written by `lcmrt build`, generate images, swap adapters.
 *
 * Same engine folder, same images as the Python runtime (`import lcmrt`): a seed gives the same image in both.
 * Runs the folder's ONNX graphs on ONNX Runtime's CPU provider. Text to image for SD1.5, SDXL and SSD-1B folders,
 * guidance none or classifier-free.
 *
 * Errors: every function returns an lcmrt_status; on failure, lcmrt_last_error() gives a message naming the problem
 * and the fix (valid until the calling thread's next lcmrt call). No C++ exception crosses this API.
 *
 * Threads: one lcmrt_pipeline may be used from several threads at once. Generations run concurrently;
 * lcmrt_set_adapters waits for running generations and holds new ones until the swap is done, so every
 * generation uses one adapter set throughout. lcmrt_images objects belong to the caller and are not shared.
 */
#ifndef LCMRT_H
#define LCMRT_H

#include <stddef.h>
#include <stdint.h>

#if defined(LCMRT_BUILDING)
#define LCMRT_API __attribute__((visibility("default")))
#else
#define LCMRT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lcmrt_status {
  LCMRT_OK = 0,
  LCMRT_ERROR_INVALID_ARGUMENT = 1, /* a bad argument: a null pointer, steps out of range, an unknown size */
  LCMRT_ERROR_ENGINE_FOLDER = 2,    /* the folder is missing, damaged, of a newer format or modified */
  LCMRT_ERROR_ADAPTER = 3,          /* an unknown adapter, a weight that cannot change, a damaged pack */
  LCMRT_ERROR_GENERATION = 4,       /* a generation that cannot run as asked (e.g. guidance on a no-guidance folder) */
  LCMRT_ERROR_BACKEND = 5,          /* ONNX Runtime failed to load or run a graph */
  LCMRT_ERROR_IO = 6,               /* a file could not be read or written */
  LCMRT_ERROR_OUT_OF_MEMORY = 7,
  LCMRT_ERROR_INTERNAL = 8          /* a bug in lcmrt: please report it with the message */
} lcmrt_status;

typedef struct lcmrt_pipeline lcmrt_pipeline; /* a loaded engine folder */
typedef struct lcmrt_images lcmrt_images;     /* the images of one generation */

/* The message of the calling thread's last failed call ("" if none). */
LCMRT_API const char* lcmrt_last_error(void);
/* A short name of a status ("invalid argument", ...). */
LCMRT_API const char* lcmrt_status_name(lcmrt_status status);
/* lcmrt's version, "MAJOR.MINOR.PATCH". */
LCMRT_API const char* lcmrt_version(void);

typedef struct lcmrt_load_options {
  int threads; /* ONNX Runtime intra-op threads per graph; 0: its default (the physical cores) */
} lcmrt_load_options;

/* Load FOLDER (checking its manifest, format version and file hashes) with its built adapter weights active.
 * options may be NULL for the defaults. On success *pipeline is set; free it with lcmrt_pipeline_free. */
LCMRT_API lcmrt_status lcmrt_pipeline_load(const char* folder, const lcmrt_load_options* options,
                                           lcmrt_pipeline** pipeline);
LCMRT_API void lcmrt_pipeline_free(lcmrt_pipeline* pipeline);

typedef struct lcmrt_request {
  const char* prompt;          /* UTF-8, required */
  const char* negative_prompt; /* UTF-8, or NULL: "" for classifier-free guidance */
  int steps;                   /* 1..50; default 4 */
  double guidance_scale;       /* <= 1: no guidance (conditional batch only); > 1: classifier-free guidance; default 1 */
  uint64_t seed;               /* the Python runtime's seed: same seed, same image */
  int num_images;              /* default 1 */
  int height, width;           /* 0: the folder's first size */
  /* Optional explicit noise instead of the seed's (as Python's latents= and step_noise=), float32, C order:
   * latents [num_images, C, H/8, W/8]; step_noise (steps - 1) such arrays back to back. NULL: drawn from seed. */
  const float* latents;
  const float* step_noise;
} lcmrt_request;

/* Fill a request with the defaults (steps 4, guidance 1, seed 0, one image, the folder's first size). */
LCMRT_API void lcmrt_request_init(lcmrt_request* request);

/* Generate images. On success *images is set; free it with lcmrt_images_free. */
LCMRT_API lcmrt_status lcmrt_generate(lcmrt_pipeline* pipeline, const lcmrt_request* request, lcmrt_images** images);

LCMRT_API int lcmrt_images_count(const lcmrt_images* images);
LCMRT_API int lcmrt_images_height(const lcmrt_images* images);
LCMRT_API int lcmrt_images_width(const lcmrt_images* images);
/* Image `index` as float32 RGB in [0, 1], [height, width, 3] row-major (as Python's output="np"); NULL if out of range. */
LCMRT_API const float* lcmrt_images_pixels(const lcmrt_images* images, int index);
/* Write image `index` as a PNG (8-bit RGB, rounded as Python's to_pil) with the generation's settings in text chunks,
 * as `lcmrt generate` writes them. path must end in .png; missing parent folders are created. */
LCMRT_API lcmrt_status lcmrt_images_save_png(const lcmrt_images* images, int index, const char* path);
/* Seconds the generation spent: text encoder, all UNet steps, VAE decode, total. */
LCMRT_API lcmrt_status lcmrt_images_timings(const lcmrt_images* images, double* text_encoder, double* unet,
                                            double* vae_decode, double* total);
/* Warnings of the generation (e.g. a prompt cut to the text encoder's length), one per line; "" if none. */
LCMRT_API const char* lcmrt_images_warnings(const lcmrt_images* images);
LCMRT_API void lcmrt_images_free(lcmrt_images* images);

/* Set the weights of the folder's refittable adapters (names[i] at weights[i]; adapters not named go to 0):
 * W = W_base + sum_i w_i * scale_i * up_i @ down_i, computed from the folder's pristine base weights, so
 * A -> B -> A gives A bit for bit. Transactional: on any error the previous set stays active. */
LCMRT_API lcmrt_status lcmrt_set_adapters(lcmrt_pipeline* pipeline, const char* const* names, const double* weights,
                                          size_t count);
/* The folder's adapters (fused ones first, then the refittable ones) with their active weights: the count, then
 * each one's name (valid as long as the pipeline), weight and whether it is refittable, by index. */
LCMRT_API size_t lcmrt_adapter_count(const lcmrt_pipeline* pipeline);
LCMRT_API lcmrt_status lcmrt_adapter_at(const lcmrt_pipeline* pipeline, size_t index, const char** name, double* weight,
                                        int* refittable);

#ifdef __cplusplus
}
#endif

#endif /* LCMRT_H */
