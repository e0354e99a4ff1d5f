#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define BIG (256UL<<20)
#define WS (256UL<<10)
int main(int argc,char**argv){
  int mode=atoi(argv[1]); // 0 normal loads, 1 prefetchnta + loads, 2 no stream
  char*big=aligned_alloc(64,BIG); memset(big,1,BIG);
  size_t n=WS/64; size_t*chase=aligned_alloc(64,WS);
  size_t*perm=malloc(n*sizeof(size_t)); for(size_t i=0;i<n;i++)perm[i]=i;
  srand(1); for(size_t i=n-1;i>0;i--){size_t j=rand()%(i+1);size_t t=perm[i];perm[i]=perm[j];perm[j]=t;}
  for(size_t i=0;i<n;i++) chase[perm[i]*8]=perm[(i+1)%n]*8;
  double tc=0, ts=0; volatile float sink=0;
  for(int it=0;it<30;it++){
    double t0=now();
    __m512 acc=_mm512_setzero_ps();
    if(mode==0){ for(size_t i=0;i<BIG;i+=64) acc=_mm512_add_ps(acc,_mm512_load_ps((float*)(big+i))); }
    else if(mode==1){ for(size_t i=0;i<BIG;i+=64){ _mm_prefetch(big+i+2048,_MM_HINT_NTA); acc=_mm512_add_ps(acc,_mm512_load_ps((float*)(big+i)));} }
    
    sink+=_mm512_reduce_add_ps(acc);
    double t1=now();
    size_t p=0; for(size_t k=0;k<n;k++) p=chase[p];
    double t2=now(); sink+=p;
    if(it>2){ts+=t1-t0; tc+=t2-t1;}
  }
  printf("mode %d: stream %.2f GB/s, chase %.1f ns/line (%zu lines)\n",mode,BIG/(ts/27)/1e9,tc/27/n*1e9,n);
}
