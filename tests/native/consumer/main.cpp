// fox FOLDER OUT.png: one image from an engine folder with the installed lcmrt.
#include <iostream>

#include <lcmrt/lcmrt.hpp>

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  try {
    lcmrt::Pipeline pipe(argv[1]);
    pipe.generate(lcmrt::Request("a watercolor fox in the snow").steps(4).seed(0)).save_png(0, argv[2]);
  } catch (const lcmrt::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
