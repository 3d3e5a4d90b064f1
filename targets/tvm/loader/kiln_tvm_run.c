/*
 * kiln_tvm_run: run a kiln TVM artifact's `main` with the TVM runtime only.
 *
 *   kiln_tvm_run LIB.so PLAN OUT_DIR
 *
 * PLAN is a text file, one directive per line (kiln writes it):
 *   params DIR                 load DIR/tensor-cache.json (external params)
 *   param NAME                 the next argument after the inputs is tensor NAME of that cache
 *   input DTYPE NDIM D0 .. Dn PATH   an input: raw little-endian bytes in PATH
 * Inputs are passed first, in order, then the params. Each output i is written
 * to OUT_DIR/out_i.bin (raw bytes) with OUT_DIR/out_i.txt holding
 * "CODE BITS LANES NDIM D0 .. Dn". Errors go to stderr with exit status 1.
 *
 * Built by kiln for the artifact's architecture and linked against
 * libtvm_runtime.so and libtvm_ffi.so from the apache-tvm wheels.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>

#define MAX_ARGS 4096
#define MAX_DIMS 16

static void fail(const char* what) {
  TVMFFIObjectHandle err = NULL;
  TVMFFIErrorMoveFromRaised(&err);
  if (err != NULL) {
    TVMFFIErrorCell* cell = (TVMFFIErrorCell*)((char*)err + sizeof(TVMFFIObject));
    fprintf(stderr, "kiln_tvm_run: %s: %.*s: %.*s\n", what, (int)cell->kind.size, cell->kind.data,
            (int)cell->message.size, cell->message.data);
  } else {
    fprintf(stderr, "kiln_tvm_run: %s\n", what);
  }
  exit(1);
}

static TVMFFIObjectHandle global(const char* name) {
  TVMFFIByteArray key = {name, strlen(name)};
  TVMFFIObjectHandle f = NULL;
  if (TVMFFIFunctionGetGlobal(&key, &f) != 0 || f == NULL) {
    fprintf(stderr, "kiln_tvm_run: the TVM runtime has no function %s\n", name);
    exit(1);
  }
  return f;
}

static TVMFFIAny none(void) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFINone;
  return a;
}

static TVMFFIAny str_arg(const char* s) {
  TVMFFIAny a = none();
  a.type_index = kTVMFFIRawStr;
  a.v_c_str = s;
  return a;
}

static TVMFFIAny int_arg(int64_t v) {
  TVMFFIAny a = none();
  a.type_index = kTVMFFIInt;
  a.v_int64 = v;
  return a;
}

static TVMFFIAny obj_arg(TVMFFIObjectHandle h) {
  TVMFFIAny a = none();
  a.type_index = ((TVMFFIObject*)h)->type_index;
  a.v_obj = (TVMFFIObject*)h;
  return a;
}

static TVMFFIAny call(TVMFFIObjectHandle f, TVMFFIAny* args, int n, const char* what) {
  TVMFFIAny out = none();
  if (TVMFFIFunctionCall(f, args, n, &out) != 0) fail(what);
  return out;
}

/* a function of a module (Module.get_function) */
static TVMFFIObjectHandle module_function(TVMFFIObjectHandle mod, const char* name) {
  TVMFFIAny args[3] = {obj_arg(mod), str_arg(name), none()};
  args[2].type_index = kTVMFFIBool;
  args[2].v_int64 = 1;
  TVMFFIAny f = call(global("ffi.ModuleGetFunction"), args, 3, name);
  if (f.type_index != kTVMFFIFunction) {
    fprintf(stderr, "kiln_tvm_run: the library has no function %s\n", name);
    exit(1);
  }
  return f.v_obj;
}

typedef struct {
  DLManagedTensor managed;
  int64_t shape[MAX_DIMS];
} Owned;

static void free_owned(DLManagedTensor* self) {
  free(self->dl_tensor.data);
  free(self);
}

static size_t tensor_bytes(const DLTensor* t) {
  size_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= (size_t)t->shape[i];
  return n * ((t->dtype.bits * t->dtype.lanes + 7) / 8);
}

static TVMFFIObjectHandle read_input(const char* dtype, int ndim, const int64_t* dims, const char* path) {
  Owned* o = (Owned*)calloc(1, sizeof(Owned));
  DLTensor* t = &o->managed.dl_tensor;
  TVMFFIByteArray s = {dtype, strlen(dtype)};
  if (TVMFFIDataTypeFromString(&s, &t->dtype) != 0) fail("bad dtype");
  t->device.device_type = kDLCPU;
  t->device.device_id = 0;
  t->ndim = ndim;
  memcpy(o->shape, dims, sizeof(int64_t) * (size_t)ndim);
  t->shape = o->shape;
  size_t nbytes = tensor_bytes(t);
  t->data = aligned_alloc(64, nbytes ? (nbytes + 63) / 64 * 64 : 64);
  FILE* f = fopen(path, "rb");
  if (f == NULL || fread(t->data, 1, nbytes, f) != nbytes) {
    fprintf(stderr, "kiln_tvm_run: cannot read %zu bytes from %s\n", nbytes, path);
    exit(1);
  }
  fclose(f);
  o->managed.deleter = free_owned;
  TVMFFIObjectHandle h = NULL;
  if (TVMFFITensorFromDLPack(&o->managed, 0, 1, &h) != 0) fail("tensor from dlpack");
  return h;
}

static void write_output(const char* dir, int index, TVMFFIAny value) {
  if (value.type_index != kTVMFFITensor) {
    fprintf(stderr, "kiln_tvm_run: output %d is not a tensor (type index %d)\n", index, value.type_index);
    exit(1);
  }
  DLTensor* t = (DLTensor*)((char*)value.v_obj + sizeof(TVMFFIObject));
  char path[4096];
  snprintf(path, sizeof(path), "%s/out_%d.txt", dir, index);
  FILE* f = fopen(path, "w");
  if (f == NULL) { perror(path); exit(1); }
  fprintf(f, "%d %d %d %d", t->dtype.code, t->dtype.bits, t->dtype.lanes, t->ndim);
  for (int i = 0; i < t->ndim; ++i) fprintf(f, " %lld", (long long)t->shape[i]);
  fprintf(f, "\n");
  fclose(f);
  snprintf(path, sizeof(path), "%s/out_%d.bin", dir, index);
  f = fopen(path, "wb");
  if (f == NULL) { perror(path); exit(1); }
  size_t nbytes = tensor_bytes(t);
  if (nbytes && fwrite((char*)t->data + t->byte_offset, 1, nbytes, f) != nbytes) { perror(path); exit(1); }
  fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: kiln_tvm_run LIB.so PLAN OUT_DIR\n");
    return 2;
  }
  TVMFFIAny args[MAX_ARGS];
  int num_inputs = 0;
  char* param_names[MAX_ARGS];
  int num_params = 0;

  FILE* plan = fopen(argv[2], "r");
  if (plan == NULL) { perror(argv[2]); return 1; }
  char line[8192];
  while (fgets(line, sizeof(line), plan) != NULL) {
    line[strcspn(line, "\n")] = 0;
    if (strncmp(line, "params ", 7) == 0) {
      TVMFFIAny a[3] = {str_arg(line + 7), int_arg(kDLCPU), int_arg(0)};
      TVMFFIAny r = call(global("vm.builtin.tensor_cache.load"), a, 3, "loading the params");
      (void)r;
    } else if (strncmp(line, "param ", 6) == 0) {
      if (num_params >= MAX_ARGS) { fprintf(stderr, "kiln_tvm_run: too many params\n"); return 1; }
      param_names[num_params++] = strdup(line + 6);
    } else if (strncmp(line, "input ", 6) == 0) {
      char dtype[64];
      int ndim = 0, used = 0;
      int64_t dims[MAX_DIMS];
      char* p = line + 6;
      if (sscanf(p, "%63s %d%n", dtype, &ndim, &used) != 2 || ndim < 0 || ndim > MAX_DIMS) {
        fprintf(stderr, "kiln_tvm_run: bad plan line: %s\n", line);
        return 1;
      }
      p += used;
      for (int i = 0; i < ndim; ++i) {
        long long d;
        if (sscanf(p, " %lld%n", &d, &used) != 1) { fprintf(stderr, "kiln_tvm_run: bad dims: %s\n", line); return 1; }
        dims[i] = d;
        p += used;
      }
      while (*p == ' ') ++p;
      if (num_inputs >= MAX_ARGS) { fprintf(stderr, "kiln_tvm_run: too many inputs\n"); return 1; }
      args[num_inputs++] = obj_arg(read_input(dtype, ndim, dims, p));
    } else if (line[0] != 0) {
      fprintf(stderr, "kiln_tvm_run: unknown plan line: %s\n", line);
      return 1;
    }
  }
  fclose(plan);

  int nargs = num_inputs;
  for (int i = 0; i < num_params; ++i) {
    TVMFFIAny a[1] = {str_arg(param_names[i])};
    TVMFFIAny t = call(global("vm.builtin.tensor_cache.get"), a, 1, param_names[i]);
    if (t.type_index != kTVMFFITensor) {
      fprintf(stderr, "kiln_tvm_run: param %s is not in the tensor cache\n", param_names[i]);
      return 1;
    }
    if (nargs >= MAX_ARGS) { fprintf(stderr, "kiln_tvm_run: too many arguments\n"); return 1; }
    args[nargs++] = t;
  }

  TVMFFIAny path = str_arg(argv[1]);
  TVMFFIAny lib = call(global("ffi.ModuleLoadFromFile"), &path, 1, "loading the library");
  TVMFFIAny vm = call(module_function(lib.v_obj, "vm_load_executable"), NULL, 0, "vm_load_executable");
  /* one CPU device: (device type, device id, allocator: 2 = pooled) */
  TVMFFIAny init[3] = {int_arg(kDLCPU), int_arg(0), int_arg(2)};
  call(module_function(vm.v_obj, "vm_initialization"), init, 3, "vm_initialization");

  TVMFFIAny result = call(module_function(vm.v_obj, "main"), args, nargs, "running main");
  if (result.type_index == kTVMFFIArray) {
    TVMFFISeqCell* seq = (TVMFFISeqCell*)((char*)result.v_obj + sizeof(TVMFFIObject));
    TVMFFIAny* items = (TVMFFIAny*)seq->data;
    for (int64_t i = 0; i < seq->size; ++i) write_output(argv[3], (int)i, items[i]);
  } else {
    write_output(argv[3], 0, result);
  }
  return 0;
}
