# multiboot/hello.S - a Multiboot v1 kernel (32-bit ELF) for kvmpy's multiboot loader.
#
# Loaded by   : vm.load_multiboot(...) at its ELF addresses (text at 0x100000)
# Entry state : 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = multiboot info
# Devices     : 16550 UART at 0x3F8 (polls LSR before each byte), isa-debug-exit at 0xF4
# Behaviour   : prints "Hello from a multiboot kernel!\n", then "cmdline: <cmdline>\n"
#               and "modules: <n>\n" (n < 10) from the multiboot info, then writes 0x21
#               to the debug-exit port: the run ends with exit code (0x21 << 1) | 1 = 0x43.
#               With a wrong boot magic it writes 0x7f instead (exit code 0xff).

        .code32
        .intel_syntax noprefix
        .text
        .globl _start
        .align 4
multiboot_header:
        .long   0x1BADB002                      # magic
        .long   0x00000003                      # page-align modules, memory info
        .long   -(0x1BADB002 + 0x00000003)      # checksum

_start:
        mov     esp, offset stack_top
        cmp     eax, 0x2BADB002
        jne     bad_magic
        mov     esi, offset hello
        call    puts
        mov     esi, offset cmdline_label
        call    puts
        test    dword ptr [ebx], 4              # MULTIBOOT_INFO_CMDLINE
        jz      1f
        mov     esi, dword ptr [ebx + 16]
        call    puts
1:      mov     esi, offset modules_label
        call    puts
        mov     eax, dword ptr [ebx + 20]       # mods_count
        add     al, '0'
        call    putc
        mov     al, '\n'
        call    putc
        mov     al, 0x21
        out     0xf4, al
        jmp     .

bad_magic:
        mov     al, 0x7f
        out     0xf4, al
        jmp     .

# puts: print the NUL-terminated string at ESI.
puts:
        lodsb
        test    al, al
        jz      2f
        call    putc
        jmp     puts
2:      ret

# putc: print AL once the transmitter holding register is empty.
putc:
        mov     ah, al
        mov     dx, 0x3fd                       # line status register
3:      in      al, dx
        test    al, 0x20                        # THR empty
        jz      3b
        mov     al, ah
        mov     dx, 0x3f8
        out     dx, al
        ret

        .section .rodata
hello:          .asciz "Hello from a multiboot kernel!\n"
cmdline_label:  .asciz "cmdline: "
modules_label:  .asciz "\nmodules: "

        .bss
        .align 16
        .space  4096
stack_top:
