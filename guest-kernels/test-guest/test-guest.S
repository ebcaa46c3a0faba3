/*
 * test-guest: a freestanding guest for testing the VMM's boot paths and exits.
 *
 * One source, several variants chosen at build time with -DVARIANT_<name>:
 *   exit0        outb 0 to port 0x601 (exit status 0)
 *   exit42       outb 42 to port 0x601 (exit status 42)
 *   reboot       outb 0xFE to port 0x64 (i8042 CPU reset; VMM exits 0)
 *   triplefault  load a zero-limit IDT, then ud2 (#UD -> #GP -> #DF -> triple fault)
 *   chatter      print '.' on COM1 forever (a guest that runs until it is stopped: pause,
 *                shutdown and kill tests watch its output grow or stop)
 *   idle         halt after booting (the vmm's resident memory at rest: issue 9's
 *                measurements, scripts/vmm-symbol-order.py's profiles)
 *   pvh          also carries the Xen PHYS32_ENTRY (PVH) note; its 32-bit entry prints
 *                its own greeting and the cmdline from hvm_start_info and exits with 80
 *                (81 if the hvm_start_info magic is wrong); its 64-bit entry exits with 64,
 *                so a VMM that ignores the note is detected.
 *
 * The 64-bit entry follows the Linux 64-bit boot protocol (long mode, identity-mapped,
 * rsi = boot_params "zero page"): it prints a greeting and the kernel command line
 * (cmd_line_ptr, u32 at zero page offset 0x228) on COM1, writes port 0x600 ("booted"),
 * then does the variant's action. Nothing falls through: every path ends in a hlt loop.
 * Kept tiny on purpose: CPL0 code may be instruction-emulated (~1M instructions/s).
 */

#define COM1_DATA        0x3f8
#define COM1_LSR         0x3fd
#define LSR_THR_EMPTY    0x20
#define PORT_BOOTED      0x600
#define PORT_EXIT_STATUS 0x601
#define I8042_COMMAND    0x64
#define I8042_RESET      0xfe
#define ZP_CMD_LINE_PTR  0x228
#define HVM_MAGIC        0x336ec578
#define HVM_CMDLINE      24
#define CMDLINE_MAX      2048

/* Prints the NUL-terminated string at %esi/%rsi on COM1, at most CMDLINE_MAX bytes. */
.macro PUTS_BODY
	mov	$CMDLINE_MAX, %ecx
1:	lodsb
	test	%al, %al
	jz	3f
	mov	%al, %ah
	mov	$COM1_LSR, %dx
2:	in	(%dx), %al
	test	$LSR_THR_EMPTY, %al
	jz	2b
	mov	%ah, %al
	mov	$COM1_DATA, %dx
	out	%al, (%dx)
	dec	%ecx
	jnz	1b
3:	ret
.endm

.macro OUTB port, value
	mov	$\port, %dx
	mov	$\value, %al
	out	%al, (%dx)
.endm

	.text
	.code64
	.globl	_start
_start:
	cli
	cld
	lea	stack_top(%rip), %rsp
	mov	%rsi, %rbx
	lea	msg_hello64(%rip), %rsi
	call	puts64
	lea	msg_cmdline(%rip), %rsi
	call	puts64
	mov	ZP_CMD_LINE_PTR(%rbx), %esi
	test	%esi, %esi
	jz	1f
	call	puts64
1:	lea	msg_newline(%rip), %rsi
	call	puts64
	OUTB	PORT_BOOTED, 1

#if defined(VARIANT_exit0)
	OUTB	PORT_EXIT_STATUS, 0
#elif defined(VARIANT_exit42)
	OUTB	PORT_EXIT_STATUS, 42
#elif defined(VARIANT_reboot)
	OUTB	I8042_COMMAND, I8042_RESET
#elif defined(VARIANT_triplefault)
	lidt	zero_idt(%rip)
	ud2
#elif defined(VARIANT_chatter)
4:	lea	msg_dot(%rip), %rsi
	call	puts64
	jmp	4b
#elif defined(VARIANT_idle)
	nop
#elif defined(VARIANT_pvh)
	OUTB	PORT_EXIT_STATUS, 64
#else
#error "define one VARIANT_<name>: exit0 exit42 reboot triplefault chatter idle pvh"
#endif
halt64:
	hlt
	jmp	halt64

puts64:
	PUTS_BODY

#if defined(VARIANT_pvh)
	.code32
pvh_start:
	cli
	cld
	cld
	mov	$stack_top, %esp
	mov	%ebx, %edi
	cmpl	$HVM_MAGIC, (%edi)
	jne	bad_magic
	mov	$msg_hello_pvh, %esi
	call	puts32
	mov	$msg_cmdline, %esi
	call	puts32
	mov	HVM_CMDLINE(%edi), %esi
	test	%esi, %esi
	jz	1f
	call	puts32
1:	mov	$msg_newline, %esi
	call	puts32
	OUTB	PORT_BOOTED, 1
	OUTB	PORT_EXIT_STATUS, 80
	jmp	halt32
bad_magic:
	mov	$msg_bad_magic, %esi
	call	puts32
	OUTB	PORT_EXIT_STATUS, 81
halt32:
	hlt
	jmp	halt32

puts32:
	PUTS_BODY

	/* XEN_ELFNOTE_PHYS32_ENTRY: owner "Xen", type 18, desc = 32-bit physical entry. */
	.pushsection .note.Xen, "a", @note
	.balign	4
	.long	4
	.long	4
	.long	18
	.asciz	"Xen"
	.balign	4
	.long	pvh_start
	.balign	4
	.popsection
#endif

	.section .rodata
msg_hello64:	.asciz	"test-guest: hello from 64-bit entry\n"
msg_cmdline:	.asciz	"cmdline: "
msg_newline:	.asciz	"\n"
msg_dot:	.asciz	"."
#if defined(VARIANT_pvh)
msg_hello_pvh:	.asciz	"test-guest: hello from PVH entry\n"
msg_bad_magic:	.asciz	"test-guest: bad hvm_start_info magic\n"
#endif
	.balign	8
zero_idt:	.word	0
		.quad	0

	.bss
	.balign	16
	.skip	1024
stack_top:
